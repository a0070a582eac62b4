"""Xinference drop-in (issue 12): every command and call a Xinference user tried, replayed against a real mesh,
with the `zinfer` CLI run as a separate process; the seed documents' CLI lines as written; operator commands."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import embedding_definition, llm_definition, served_mesh
from tests.mesh import REPO, Mesh, free_port
from zinfer.shared.errors import Conflict, InvalidRequest, NotFound, QueueFull

SEEDS = REPO.parent / "shared" / "seeds"
PROMPT = "What is the largest animal in the world?"


@pytest.fixture(scope="module")
def xm(tmp_path_factory, tiny_models):
    with served_mesh(tmp_path_factory, tiny_models, "dropin", ["hf", "gg", "emb"]) as m:
        yield m


def cli(m: Mesh, *args: str, stdin: str | None = None, timeout: float = 120, env: dict | None = None):
    """`zinfer ARGS` as a user runs it (a separate process, this mesh's endpoint and home)."""
    proc = subprocess.run([sys.executable, "-m", "zinfer", *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, env={**m.env, **(env or {})}, timeout=timeout)
    return proc


def ok(m: Mesh, *args: str, **kw) -> str:
    proc = cli(m, *args, **kw)
    assert proc.returncode == 0, f"zinfer {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def refused(m: Mesh, *args: str, **kw) -> str:
    """A user error: exit code 1, one red line (no traceback), the message on stderr."""
    proc = cli(m, *args, **kw)
    assert proc.returncode != 0, f"zinfer {' '.join(args)} succeeded: {proc.stdout}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc.stderr


def greedy(m: Mesh, uid: str, prompt: str, max_tokens: int) -> str:
    return m.client.get_model(uid).generate(prompt, {"max_tokens": max_tokens, "temperature": 0})["choices"][0]["text"]


# ---------------------------------------------------------------- CLI spellings


@pytest.mark.parametrize("stream", ["false", "False", "true", "0"])
def test_generate_takes_max_tokens_with_an_underscore_and_stream_as_a_word(xm, stream):
    """`--stream false` once made `false` the prompt (exit 0); `--max_tokens` was "No such option"."""
    out = ok(xm, "generate", "--model-uid", "hf", "--max_tokens", "8", "--stream", stream, "--temperature", "0",
             PROMPT)
    assert out.rstrip("\n") == greedy(xm, "hf", PROMPT, 8)
    out = ok(xm, "generate", "-u", "gg", f"--stream={stream}", "--max_tokens=6", "--temperature", "0", PROMPT)
    assert out.rstrip("\n") == greedy(xm, "gg", PROMPT, 6)
    assert "'maybe' is not true or false" in refused(xm, "generate", "-u", "hf", "--stream=maybe", PROMPT)


def test_chat_takes_a_first_message(xm):
    """`zinfer chat -u X "Hello"` was "unexpected extra argument": now it answers that message."""
    want = xm.client.get_model("hf").chat([{"role": "user", "content": "Hello"}],
                                          {"max_tokens": 8, "temperature": 0})["choices"][0]["message"]["content"]
    out = ok(xm, "chat", "-u", "hf", "Hello", "--max_tokens", "8", "--stream", "false", "--temperature", "0")
    assert out.rstrip("\n") == want
    # Interactive, as before: the history is kept across turns.
    out = ok(xm, "chat", "-u", "hf", "--max_tokens", "4", stdin="Hello\nAgain\n\n")
    assert out.count("Assistant: ") == 2


def test_launch_takes_xinference_options(xm):
    """--gpu-idx 0,1 ("Input should be a valid integer"), --model-engine, --trust-remote-code, extra --name
    value pairs ("No such option")."""
    for args in (["--gpu-idx", "0,1"], ["--gpu-idx", "0", "--gpu-idx", "1"]):
        err = refused(xm, "launch", "-n", "custom-llama-2", "-u", "gpus", *args)
        assert "gpu_idx ['cuda:0', 'cuda:1']" in err and "no GPU workers" in err
    out = ok(xm, "launch", "--model-name", "custom-llama-2", "--model-engine", "transformers", "-u", "by-engine")
    assert xm.client.describe_model("by-engine")["model_format"] == "pytorch" and "by-engine" in out
    assert "runs ggufv2, ggmlv3" in refused(xm, "launch", "-n", "custom-llama-2", "-f", "pytorch",
                                             "--model-engine", "llama.cpp", "-u", "x1")
    # trust_remote_code feeds the security policy: asked for, refused (not in trust_remote_code_models).
    err = refused(xm, "launch", "-n", "custom-llama-2", "--trust-remote-code", "true", "-u", "x2")
    assert "trust_remote_code" in err and "trust_remote_code_models" in err
    ok(xm, "launch", "-n", "custom-llama-2", "--trust-remote-code", "false", "-u", "no-code")
    # Extra options are engine options, each checked.
    ok(xm, "launch", "-n", "custom-llama-2", "-f", "ggufv2", "--n_ctx", "512", "--request_limits", "4", "-u", "ctx")
    assert xm.client.describe_model("ctx")["context_length"] == 512
    assert "did you mean 'n_ctx'" in refused(xm, "launch", "-n", "custom-llama-2", "-f", "ggufv2", "--n_ctxx",
                                             "512", "-u", "x3")
    assert "n_ctx is an option of the llama.cpp engine; this model runs on transformers" in refused(
        xm, "launch", "-n", "custom-llama-2", "-f", "pytorch", "--n_ctx", "512", "-u", "x4")
    assert "--n_ctx needs a value" in refused(xm, "launch", "-n", "custom-llama-2", "--n_ctx")
    assert "model_size_in_billions 'abc' must be a number" in refused(xm, "launch", "-n", "custom-llama-2",
                                                                     "-s", "abc")
    for uid in ("by-engine", "no-code", "ctx"):
        xm.client.terminate_model(uid)
    assert not {"x1", "x2", "x3", "x4", "gpus"} & set(xm.client.list_models())


def test_user_errors_are_one_line_never_a_traceback(xm, tmp_path):
    """generate on an embedding model was an AttributeError traceback; a non-UTF-8 file a UnicodeDecodeError."""
    err = refused(xm, "generate", "-u", "emb", "Hello")
    assert "'emb' is an embedding model: it cannot generate" in err and err.count("\n") == 1
    assert "cannot chat" in refused(xm, "chat", "-u", "emb", "Hello")
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"model_name": "café"}'.encode("latin-1"))
    err = refused(xm, "register", "--model-type", "LLM", "--file", str(bad))
    assert f"--file {bad}: not UTF-8 text (byte 0xe9 at offset 19)" in err
    # --debug shows the traceback (anywhere on the line), the one line still ends it.
    proc = cli(xm, "generate", "-u", "emb", "Hello", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "InvalidRequest" in proc.stderr


# ---------------------------------------------------------------- client keywords


def test_launch_model_takes_xinference_keywords_and_refuses_typos(xm):
    c = xm.client
    host = c.scheduler_status()["workers"][0]["host"]
    uid = c.launch_model(model_name="custom-llama-2", model_engine="llama.cpp", worker_ip=host, request_limits=1,
                         model_uid="limited")
    assert c.describe_model(uid)["model_format"] == "ggufv2"
    # request_limits bounds what the instance holds: one stream running, the next is refused at once.
    stream = c.get_model(uid).generate(PROMPT, {"max_tokens": 400, "stream": True, "ignore_eos": True})
    next(stream)
    with pytest.raises(QueueFull, match="request_limits"):
        c.get_model(uid).generate(PROMPT, {"max_tokens": 2})
    stream.close()
    c.terminate_model(uid)
    with pytest.raises(InvalidRequest, match="did you mean 'model_engine'") as err:
        c.launch_model(model_name="custom-llama-2", model_engin="transformers")
    assert err.value.field == "model_engin"
    with pytest.raises(InvalidRequest, match=r"gpu_idx \['cuda:0'\]"):  # was ProtocolError: undecodable request
        c.launch_model(model_name="custom-llama-2", gpu_idx="0")
    with pytest.raises(InvalidRequest, match="worker_ip"):
        c.launch_model(model_name="custom-llama-2", worker_ip="10.9.9.9", model_uid="elsewhere")


# ---------------------------------------------------------------- launch checks in order


def test_missing_files_are_named_before_any_memory_figure(xm, tiny_models, tmp_path):
    """A deleted model folder said "not enough memory ... 32,043 MiB" (from model_size_in_billions: 7)."""
    folder = tmp_path / "copy"
    shutil.copytree(tiny_models["pytorch"], folder)
    definition = llm_definition(tiny_models, "deleted-later")
    definition["model_specs"][0].update(model_uri=f"file://{folder}", model_size_in_billions=7)
    xm.client.register_model("LLM", definition)
    try:
        shutil.rmtree(folder)
        with pytest.raises(NotFound) as err:
            xm.client.launch_model(model_name="deleted-later", model_format="pytorch")
        assert f"model_uri {folder} does not exist on host" in str(err.value) and "memory" not in str(err.value)
        assert err.value.field == "model_uri" and "deleted-later" not in xm.client.list_models()
    finally:
        xm.client.unregister_model("LLM", "deleted-later")


def test_a_single_file_uri_loads_only_its_own_quantization(xm, tiny_models):
    """model_uri naming the F32 file with -q F16 loaded the F32 file and listed F16."""
    definition = llm_definition(tiny_models, "one-file")
    spec = definition["model_specs"][1]
    spec["model_uri"] = f"file://{tiny_models['gguf']}"  # tiny-llama.F32.gguf
    definition["model_specs"] = [spec]
    xm.client.register_model("LLM", definition)
    try:
        err = refused(xm, "launch", "-n", "one-file", "-f", "ggufv2", "-q", "F16", "-u", "f16")
        assert "quantization 'F16': model_uri names one file, tiny-llama.F32.gguf, which is the F32 file" in err
        ok(xm, "launch", "-n", "one-file", "-f", "ggufv2", "-q", "F32", "-u", "f32")
        assert xm.client.describe_model("f32")["quantization"] == "F32"
        xm.client.terminate_model("f32")
    finally:
        xm.client.unregister_model("LLM", "one-file")


# ---------------------------------------------------------------- error texts, register --force


def test_error_texts_give_the_valid_values_and_the_closest_name(xm, tiny_models):
    definition = llm_definition(tiny_models, "texts")
    definition["model_specs"][0]["model_format"] = "safetensors"
    with pytest.raises(InvalidRequest) as err:
        xm.client.register_model("LLM", definition)
    assert "model_specs[0].model_format: invalid value 'safetensors'; valid values: ggmlv3, ggufv2, pytorch" \
        in str(err.value)
    definition = llm_definition(tiny_models, "texts")
    definition["model_abilty"] = definition.pop("model_ability")
    with pytest.raises(InvalidRequest, match=r"model_abilty: unknown field \(did you mean 'model_ability'\?\)"):
        xm.client.register_model("LLM", definition)
    with pytest.raises(InvalidRequest, match="this is an embedding definition"):
        xm.client.register_model("LLM", embedding_definition(tiny_models, "texts"))
    with pytest.raises(InvalidRequest, match=r"response_format.type: invalid value 'json'; valid values: "
                                             r"json_object, json_schema, text"):
        xm.client.get_model("gg").generate(PROMPT, {"response_format": {"type": "json"}})


def test_register_force_replaces_a_definition_atomically(xm, tiny_models, tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(llm_definition(tiny_models, "replace-me")))
    ok(xm, "register", "--model-type", "LLM", "--file", str(path), "--persist")
    err = refused(xm, "register", "--model-type", "LLM", "--file", str(path), "--persist")
    assert "already registered as a custom LLM; unregister it first" in err and "--force" in err
    path.write_text(json.dumps(llm_definition(tiny_models, "replace-me", context_length=1024)))
    ok(xm, "register", "--model-type", "LLM", "--file", str(path), "--persist", "--force")
    assert xm.client.get_model_registration("LLM", "replace-me")["context_length"] == 1024
    stored = json.loads((xm.home / "models" / "LLM" / "replace-me.json").read_text())
    assert stored["context_length"] == 1024  # the persisted file was replaced too
    # A bad replacement leaves the old one whole.
    path.write_text(json.dumps(llm_definition(tiny_models, "replace-me", context_length=-5)))
    refused(xm, "register", "--model-type", "LLM", "--file", str(path), "--persist", "--force")
    assert xm.client.get_model_registration("LLM", "replace-me")["context_length"] == 1024
    # Not while an instance runs.
    xm.client.launch_model(model_name="replace-me", model_format="ggufv2", model_uid="running")
    with pytest.raises(Conflict, match=r"launched instances \['running'\]; terminate them first, then replace"):
        xm.client.register_model("LLM", llm_definition(tiny_models, "replace-me"), persist=True, force=True)
    xm.client.terminate_model("running")
    xm.client.unregister_model("LLM", "replace-me")


def test_registrations_of_embeddings_show_their_own_columns(xm):
    out = ok(xm, "registrations", "-t", "embedding")
    header = next(line for line in out.splitlines() if "Name" in line)
    assert all(col in header for col in ("Dimensions", "Max tokens", "Languages", "Built-in"))
    row = next(line for line in out.splitlines() if "custom-bge-base-en" in line)
    assert re.search(r"384\s*│\s*256\s*│\s*en\s*│\s*no", row), row
    items = {i["model_name"]: i for i in json.loads(ok(xm, "registrations", "-t", "embedding", "--json"))}
    assert items["custom-bge-base-en"]["dimensions"] == 384 and items["custom-bge-base-en"]["max_tokens"] == 256


def test_version_and_shell_completion(xm):
    assert re.fullmatch(r"zinfer \d+\.\d+\.\d+.*\n", ok(xm, "--version"))
    assert ok(xm, "-v") == ok(xm, "--version")
    help_text = ok(xm, "--help")
    assert "--install-completion" in help_text and "--show-completion" in help_text


# ---------------------------------------------------------------- the seed documents, as written


def seed_cli_lines(seed: Path) -> list[str]:
    return [line.strip() for line in seed.read_text().splitlines() if line.strip().startswith("xinference ")]


@pytest.mark.parametrize("seed", sorted(SEEDS.glob("*.txt")), ids=lambda s: s.name[:3])
def test_the_seed_documents_cli_lines(seed, tiny_models, tmp_path):
    lines = seed_cli_lines(seed)
    verbs = [line.split()[1] for line in lines]
    assert verbs == ["register", "registrations", "launch", "generate", "unregister"], lines
    (tmp_path / "model.json").write_text(json.dumps(llm_definition(tiny_models)))  # the docs' custom-llama-2
    m = Mesh(tmp_path / "home", tmp_path).start_all()
    try:
        uid = None
        for line in lines:
            args = line.split()[1:]
            args = [{"<model_type>": "LLM", "${UID}": uid or ""}.get(a, a) for a in args]
            if args[0] == "unregister" and uid:
                # zinfer refuses to unregister a model with running instances (Xinference's docs skip this):
                ok(m, "terminate", "--model-uid", uid)
            if args[0] == "generate":
                out = cli(m, *args, stdin=f"{PROMPT}\n\n")
                assert out.returncode == 0, out.stderr
                assert out.stdout.startswith(f"Prompt: {PROMPT}\n") and len(out.stdout) > len(PROMPT) + 12
                # Xinference's own forms of the options, on the same line
                for extra in (["--max_tokens", "8", "--stream", "false"], ["--max_tokens", "8", "--stream", "True"]):
                    out = ok(m, *args, *extra, "--temperature", "0", stdin=f"{PROMPT}\n\n")
                    assert out == f"Prompt: {PROMPT}\n{greedy(m, uid, PROMPT, 8)}\nPrompt: \n"
                continue
            proc = subprocess.run([sys.executable, "-m", "zinfer", *args], capture_output=True, text=True,
                                  cwd=tmp_path, env={**m.env, "PYTHONPATH": str(REPO)}, timeout=120)
            assert proc.returncode == 0, f"{line}: {proc.stderr}"
            if args[0] == "launch":
                uid = re.search(r"Model uid: (\S+)", proc.stdout).group(1)
            if args[0] == "registrations":
                assert "custom-llama-2" in proc.stdout
        assert "custom-llama-2" not in {r["model_name"] for r in m.client.list_model_registrations("LLM")}
        assert not (m.home / "models" / "LLM" / "custom-llama-2.json").exists()  # --persist, then unregister
    finally:
        m.stop()


# ---------------------------------------------------------------- operator commands


def test_up_logs_down(tmp_path):
    """`zinfer up` in the background, `zinfer logs registry`, `zinfer down`: no process and no pid file left."""
    home = tmp_path / "home"
    env = dict(os.environ, ZINFER_HOME=str(home), ZINFER_ENDPOINT=f"tcp://127.0.0.1:{free_port()}",
               ZINFER_GATEWAY_PORT=str(free_port()), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               ZINFER_HEARTBEAT_INTERVAL="0.5", ZINFER_HEARTBEAT_LIVENESS="6")

    def run(*args, check=True):
        proc = subprocess.run([sys.executable, "-m", "zinfer", *args], capture_output=True, text=True, cwd=REPO,
                              env=env, timeout=120)
        assert not check or proc.returncode == 0, f"zinfer {' '.join(args)}: {proc.stderr}"
        return proc

    out = open(tmp_path / "up.out", "w+")
    up = subprocess.Popen([sys.executable, "-m", "zinfer", "up"], cwd=REPO, env=env, stdout=out,
                          stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "zinfer is up" not in (tmp_path / "up.out").read_text():
            assert up.poll() is None, (tmp_path / "up.out").read_text()
            assert time.monotonic() < deadline, "zinfer up did not come up in 120 s"
            time.sleep(0.1)
        record = json.loads((home / "run" / "up.json").read_text())
        pids = [record["pid"]] + [c["pid"] for c in record["children"]]
        assert record["pid"] == up.pid and len(record["children"]) == 6  # with the preloader
        # A second `up` from the same home is refused, naming the first.
        second = run("up", check=False)
        assert second.returncode == 1 and f"already running from {home}" in second.stderr
        assert f"pid {up.pid}" in second.stderr
        # Each service logs JSON lines to its own file; `zinfer logs SERVICE` shows them.
        logs = run("logs", "registry", "-n", "20").stdout.splitlines()
        events = [json.loads(line) for line in logs]
        assert events and all(e["service"] == "registry" for e in events)
        assert "registry_loaded" in {e["event"] for e in events}
        merged = {json.loads(line)["service"] for line in run("logs", "-n", "200").stdout.splitlines()}
        assert {"broker", "registry", "scheduler", "worker/cpu", "preloader"} <= merged
        assert "no log for service 'nosuch'" in run("logs", "nosuch", check=False).stderr
        # `zinfer down` stops it all.
        assert "stopped the mesh" in run("down").stdout
        assert up.wait(timeout=30) == 0
        for pid in pids:
            assert not _running(pid), f"pid {pid} still runs after zinfer down"
        assert not (home / "run" / "up.json").exists()
        assert "no mesh" in run("down").stdout
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        out.close()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def _readline(proc: subprocess.Popen, timeout: float = 30) -> str:
    """A line of the process's output, or a failure after `timeout` (never a hung test)."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), f"no line from {proc.args} within {timeout}s"
    return proc.stdout.readline()


def test_logs_follow_prints_new_lines_and_survives_rotation(tmp_path):
    folder = tmp_path / "home" / "logs"
    folder.mkdir(parents=True)
    log = folder / "registry.log"
    log.write_text(json.dumps({"event": "first", "service": "registry", "timestamp": "1"}) + "\n")
    env = dict(os.environ, ZINFER_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    follow = subprocess.Popen([sys.executable, "-m", "zinfer", "logs", "registry", "-f", "--json"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(_readline(follow))["event"] == "first"
        with open(log, "a") as f:  # at once: a line written while it starts to follow is not lost
            f.write(json.dumps({"event": "second", "service": "registry", "timestamp": "2"}) + "\n")
        assert json.loads(_readline(follow))["event"] == "second"
        log.rename(folder / "registry.log.1")  # what RotatingFileHandler does
        log.write_text(json.dumps({"event": "third", "service": "registry", "timestamp": "3"}) + "\n")
        assert json.loads(_readline(follow))["event"] == "third"
    finally:
        follow.kill()
        follow.wait()


def test_logs_render_for_a_person(tmp_path, capsys):
    """On a terminal `zinfer logs` renders lines as structlog's console does, tracebacks as Python prints them."""
    from structlog.tracebacks import ExceptionDictTransformer

    from zinfer.cli.ops_cmds import _Printer

    try:
        raise ValueError("boom")
    except ValueError:
        stack = ExceptionDictTransformer(show_locals=False)(sys.exc_info())
    show = _Printer(raw=False)  # colours only on a terminal; the layout is the same
    show(json.dumps({"event": "worker_joined", "level": "info", "worker": "cpu", "service": "scheduler",
                     "timestamp": "2026-01-01T00:00:00Z"}))
    show(json.dumps({"event": "load_failed", "level": "error", "exception": stack, "service": "scheduler",
                     "timestamp": "2026-01-01T00:00:01Z"}))
    show("not json")
    text = capsys.readouterr().out
    assert "worker_joined" in text and "worker=cpu" in text and "[info" in text
    assert "Traceback (most recent call last)" in text and "ValueError: boom" in text
    assert text.rstrip().endswith("not json")

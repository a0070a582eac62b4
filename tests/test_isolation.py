"""One process per instance replica: a fault stays with its instance, and instances heal themselves.

Real processes throughout: broker, registry, scheduler and a CPU worker whose instances each run in a process of
their own; faults are real signals to those processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import embedding_definition, llm_definition
from tests.mesh import REPO, Mesh, gone
from zinfer.shared import wire
from zinfer.shared.errors import InvalidRequest, Unavailable, ZinferError

PROMPT = "Once upon a time"
GREEDY = {"max_tokens": 12, "temperature": 0}


def fast_restarts(m: Mesh, limit: int = 5) -> Mesh:
    m.env.update(ZINFER_RESTART_BACKOFF_S="0.2", ZINFER_RESTART_LIMIT=str(limit), ZINFER_TERMINATE_GRACE_S="2")
    return m


@pytest.fixture(scope="module")
def iso(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("isolation")
    m = fast_restarts(Mesh(root / "home", root), limit=3).start_all()
    c = m.client
    c.register_model("LLM", llm_definition(tiny_models))
    c.register_model("embedding", embedding_definition(tiny_models))
    c.launch_model(model_name="custom-llama-2", model_format="ggufv2", quantization="F32", model_uid="gg")
    c.launch_model(model_name="custom-llama-2", model_format="pytorch", model_uid="hf")
    c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="emb")
    yield m
    m.stop()


def pid_of(m: Mesh, uid: str) -> int:
    return m.wait(lambda: m.client.describe_model(uid)["pids"][0] or None, timeout=30)


class EmbedLoop:
    """A client embedding one sentence in a loop (bounded: 3,000 requests or 90 s), counting errors."""

    def __init__(self, m: Mesh, uid: str = "emb"):
        self.client = m.new_client(timeout=20)
        self.uid = uid
        self.done = threading.Event()
        self.ok = 0
        self.errors: list[Exception] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        model = self.client.get_model(self.uid)
        deadline = time.monotonic() + 90
        for _ in range(3000):
            if self.done.is_set() or time.monotonic() > deadline:
                break
            try:
                assert len(model.create_embedding("a sentence to embed")["data"]) == 1
                self.ok += 1
            except (ZinferError, AssertionError) as exc:
                self.errors.append(exc)

    def __enter__(self) -> EmbedLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=30)
        self.client.close()


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_a_crashed_instance_restarts_by_itself_while_its_neighbours_answer(iso, sig):
    c = iso.client
    before = c.get_model("gg").generate(PROMPT, GREEDY)["choices"][0]["text"]
    restarts = c.describe_model("gg")["restarts"]
    pid = pid_of(iso, "gg")
    with EmbedLoop(iso) as loop:
        iso.wait(lambda: loop.ok >= 5 or None, timeout=30)
        killed = time.monotonic()
        os.kill(pid, sig)
        # Ready again by itself, in a new process, within 15 s.
        iso.wait(lambda: (lambda v: v["state"] == "ready" and v["restarts"] > restarts and v["pids"][0] != pid
                          or None)(c.describe_model("gg")), timeout=15)
        back = time.monotonic() - killed
        served_before = loop.ok
        iso.wait(lambda: loop.ok > served_before + 5 or None, timeout=30)
    assert loop.errors == [], loop.errors[:3]  # the neighbour answered throughout
    assert back < 15
    view = c.describe_model("gg")
    assert sig.name in view["restart_cause"], view
    if sig == signal.SIGSEGV:  # faulthandler's stack names the frame it was in
        assert " in " in view["restart_cause"], view
    assert c.get_model("gg").generate(PROMPT, GREEDY)["choices"][0]["text"] == before
    assert c.describe_model("hf")["restarts"] == 0 and c.describe_model("emb")["restarts"] == 0
    listed = subprocess.run([sys.executable, "-m", "zinfer", "list"], env=iso.env, cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert f"killed by {sig.name}" in listed.stdout and "restarted" in listed.stdout, listed.stdout + listed.stderr


def test_a_request_in_flight_on_a_dead_instance_fails_at_once_as_unavailable(iso):
    c = iso.client
    result = {}

    def long_generation():
        client = iso.new_client(timeout=60)
        try:
            client.get_model("hf").generate(PROMPT, {"max_tokens": 1900, "temperature": 0, "ignore_eos": True})
            result["error"] = None
        except ZinferError as exc:
            result["error"] = exc
        finally:
            client.close()

    t = threading.Thread(target=long_generation)
    t.start()
    iso.wait(lambda: c.describe_model("hf")["inflight"] == 1 or None, timeout=30)
    killed = time.monotonic()
    os.kill(pid_of(iso, "hf"), signal.SIGKILL)
    t.join(timeout=30)
    assert isinstance(result.get("error"), Unavailable), result
    assert time.monotonic() - killed < 3  # the broker sees the connection close; no liveness wait
    iso.wait(lambda: c.describe_model("hf")["state"] == "ready" or None, timeout=30)
    assert c.get_model("hf").generate(PROMPT, GREEDY)["usage"]["completion_tokens"] >= 1


def test_terminate_ends_the_process_and_returns_its_memory(iso):
    c = iso.client
    c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="tmp-emb")
    pid = pid_of(iso, "tmp-emb")
    held = c.describe_model("tmp-emb")["memory"]
    assert held > 10 * 2**20  # its process's RSS: the model and the libraries it has paged in
    free = c.scheduler_status()["workers"][0]["free_memory"]
    start = time.monotonic()
    c.terminate_model("tmp-emb")
    assert gone(pid)
    iso.wait(lambda: c.scheduler_status()["workers"][0]["free_memory"] >= free + held * 0.8 or None, timeout=2)
    assert time.monotonic() - start < 4


def test_a_hung_instance_is_killed_within_the_grace_period(iso):
    """A process that does not answer SIGTERM (stopped, as one stuck in a native call is): SIGKILL after the
    grace period (2 s here)."""
    c = iso.client
    c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="hung")
    pid = pid_of(iso, "hung")
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    c.terminate_model("hung")
    took = time.monotonic() - start
    assert gone(pid)
    assert 2 <= took < 2 + 5, took
    assert "hung" not in c.list_models()


def test_a_bad_config_json_is_an_invalid_request_naming_model_uri(iso, tiny_models, tmp_path):
    c = iso.client
    broken = tmp_path / "broken-llama"
    shutil.copytree(tiny_models["pytorch"], broken)
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    d = llm_definition(tiny_models, "broken-config")
    d["model_specs"] = [{**d["model_specs"][0], "model_uri": f"file://{broken}"}]
    c.register_model("LLM", d)
    with pytest.raises(InvalidRequest, match="config.json: is not valid JSON") as err:
        c.launch_model(model_name="broken-config", model_format="pytorch")
    assert err.value.field == "model_uri"
    c.terminate_model("broken-config")
    # Truncated weights: the safetensors header promises more bytes than the file has.
    (broken / "config.json").write_text((tiny_models["pytorch"] / "config.json").read_text())
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(InvalidRequest, match="model.safetensors: is truncated") as err:
        c.launch_model(model_name="broken-config", model_format="pytorch")
    assert err.value.field == "model_uri"
    c.terminate_model("broken-config")
    c.unregister_model("LLM", "broken-config")
    assert c.describe_model("emb")["state"] == "ready"


def test_a_ggml_file_without_byte_tokens_is_refused_at_launch(iso, tiny_models, tmp_path):
    """llama.cpp aborts the process (std::out_of_range in llama_vocab::byte_to_token) at the first prompt with a
    byte its SentencePiece vocabulary lacks; the file is refused before an engine sees it."""
    from zinfer.shared import tinyggml
    from zinfer.shared.tinymodels import gguf_tensors

    cfg, tensors = gguf_tensors(tiny_models["pytorch"])
    vocab = tinyggml.spm_vocab(tiny_models["pytorch"], cfg["vocab_size"])
    vocab = vocab[:3] + [(f"\u2581nobyte{i}", -1.0 - i, "normal") for i in range(256)] + vocab[259:]
    tinyggml.write_ggml_v3(tmp_path / "nobytes.ggmlv3.q8_0.bin", cfg, vocab, tensors, "q8_0")
    d = llm_definition(tiny_models, "no-byte-tokens")
    d["model_specs"] = [{"model_format": "ggmlv3", "model_size_in_billions": 1, "quantizations": ["q8_0"],
                         "model_id": "x/nobytes", "model_file_name_template": "nobytes.ggmlv3.{quantization}.bin",
                         "model_uri": f"file://{tmp_path}"}]
    c = iso.client
    c.register_model("LLM", d)
    with pytest.raises(InvalidRequest, match="without byte tokens for 256 of the 256 bytes") as err:
        c.launch_model(model_name="no-byte-tokens")
    assert err.value.field == "model_uri"
    c.terminate_model("no-byte-tokens")
    c.unregister_model("LLM", "no-byte-tokens")
    assert {c.describe_model(u)["state"] for u in ("gg", "hf", "emb")} == {"ready"}


def test_two_replicas_launch_on_a_fresh_worker_and_a_failed_uid_relaunches_at_once(mesh, tiny_models):
    c = mesh.client
    c.register_model("LLM", llm_definition(tiny_models))
    c.launch_model(model_name="custom-llama-2", model_format="pytorch", model_uid="pt", replica=2)
    view = c.describe_model("pt")
    assert view["state"] == "ready" and view["replica"] == 2 and len(set(view["pids"])) == 2
    assert c.get_model("pt").generate(PROMPT, GREEDY)["usage"]["completion_tokens"] >= 1
    c.terminate_model("pt")
    # A launch that fails (4-bit needs a GPU), terminated and launched again under its uid at once.
    with pytest.raises(InvalidRequest, match="needs a GPU"):
        c.launch_model(model_name="custom-llama-2", model_format="pytorch", quantization="4-bit", model_uid="pt")
    c.terminate_model("pt")
    c.launch_model(model_name="custom-llama-2", model_format="pytorch", model_uid="pt")
    assert c.describe_model("pt")["state"] == "ready"
    assert c.get_model("pt").generate(PROMPT, GREEDY)["usage"]["completion_tokens"] >= 1


def test_a_crash_loop_ends_failed_with_the_cause(iso):
    """restart_limit is 3 in this mesh: the fourth crash within the window leaves the instance failed."""
    c = iso.client
    c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="loop")
    for restarts in (1, 2, 3):
        os.kill(pid_of(iso, "loop"), signal.SIGKILL)
        iso.wait(lambda n=restarts: (lambda v: v["state"] == "ready" and v["restarts"] == n
                                     or None)(c.describe_model("loop")), timeout=30)
    os.kill(pid_of(iso, "loop"), signal.SIGKILL)
    iso.wait(lambda: c.describe_model("loop")["state"] == "failed" or None, timeout=30)
    view = c.describe_model("loop")
    assert "restart_limit" in view["error"]["message"] and "SIGKILL" in view["error"]["message"], view
    assert view["pids"] == [0]
    c.terminate_model("loop")
    c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="loop")
    assert len(c.get_model("loop").create_embedding("back")["data"]) == 1
    c.terminate_model("loop")


def test_instances_come_back_after_the_worker_and_the_scheduler_restart(tmp_path, tiny_models):
    """SIGKILL the worker (its instance processes die with it) and the scheduler: once they are back, every
    instance is loaded again from the scheduler's desired state, with its uid and the same greedy output; while
    no process holds them they are never `ready`."""
    m = fast_restarts(Mesh(tmp_path / "home", tmp_path)).start_all()
    try:
        c = m.client
        c.register_model("LLM", llm_definition(tiny_models))
        c.register_model("embedding", embedding_definition(tiny_models))
        c.launch_model(model_name="custom-llama-2", model_format="ggufv2", quantization="F32", model_uid="gg")
        c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="emb")
        before = c.get_model("gg").generate(PROMPT, GREEDY)["choices"][0]["text"]
        pids = [pid_of(m, "gg"), pid_of(m, "emb")]
        m.kill("worker/cpu")
        m.wait(lambda: all(gone(p) for p in pids) or None, timeout=10)
        m.wait(lambda: {v["state"] for v in c.list_models().values()} == {"restarting"} or None, timeout=20)
        m.kill("scheduler")
        m.start("scheduler", "scheduler")
        m.wait_services({"scheduler"})
        m.wait(lambda: {v["state"] for v in c.list_models().values()} == {"restarting"} or None, timeout=20)
        m.start_worker("cpu")
        m.wait(lambda: {u: v["state"] for u, v in c.list_models().items()} == {"gg": "ready", "emb": "ready"}
               or None, timeout=90)
        assert c.get_model("gg").generate(PROMPT, GREEDY)["choices"][0]["text"] == before
        assert len(c.get_model("emb").create_embedding("hi")["data"]) == 1
    finally:
        m.stop()


def test_an_instance_stops_as_soon_as_its_worker_is_killed(tmp_path, tiny_models):
    """The worker SIGKILLed: its instance stops at once and leaves the broker (DISCONNECT), so the restarted
    worker's instance can take the same name. Heartbeats of 30 s here: an instance that found out only at its
    next report (every heartbeat interval) would outlive the wait below."""
    m = Mesh(tmp_path / "home", tmp_path, heartbeat=30.0).start_all()
    try:
        # The broker acknowledges an accepted READY at once (a HEARTBEAT), not at its next heartbeat 30 s on: an
        # instance reports `ready` only once it has joined.
        peer = m.raw_socket(m.service_key)
        peer.send_multipart(wire.peer_ready("ack-probe"))
        assert peer.poll(10_000) and peer.recv_multipart() == wire.HEARTBEAT_FRAMES
        peer.send_multipart(wire.DISCONNECT_FRAMES)
        peer.close(linger=100)
        c = m.client
        c.register_model("LLM", llm_definition(tiny_models))
        c.launch_model(model_name="custom-llama-2", model_format="ggufv2", quantization="F32", model_uid="gg")
        pid = pid_of(m, "gg")
        m.kill("worker/cpu")
        m.wait(lambda: gone(pid) or None, timeout=10)
        m.wait(lambda: not any(peer["service"].startswith("worker/cpu#gg/") for peer in c.broker_status()["peers"])
               or None, timeout=10)
        assert "worker_gone" in (m.home / "logs" / "worker-cpu-gg-0.log").read_text()
    finally:
        m.stop()


def test_the_instances_of_a_worker_that_does_not_return_move_to_another(tmp_path, tiny_models):
    m = fast_restarts(Mesh(tmp_path / "home", tmp_path))
    m.env["ZINFER_WORKER_RETURN_S"] = "2"
    m.start_all(workers=("cpu:0", "cpu:1"), budgets={"cpu:0": 6000, "cpu:1": 4000})  # most free memory: cpu:0
    try:
        c = m.client
        c.register_model("LLM", llm_definition(tiny_models))
        c.launch_model(model_name="custom-llama-2", model_format="ggufv2", quantization="F32", model_uid="gg")
        assert c.describe_model("gg")["devices"] == ["cpu:0"]
        before = c.get_model("gg").generate(PROMPT, GREEDY)["choices"][0]["text"]
        m.kill("worker/cpu:0")
        m.wait(lambda: c.describe_model("gg")["state"] == "restarting" or None, timeout=20)
        m.wait(lambda: (lambda v: v["state"] == "ready" and v["devices"] == ["cpu:1"] or None)(c.describe_model("gg")),
               timeout=60)
        assert "moved from cpu:0 to cpu:1" in c.describe_model("gg")["restart_cause"]
        assert c.get_model("gg").generate(PROMPT, GREEDY)["choices"][0]["text"] == before
        # The old worker comes back: the instance stays where it is now, and the old worker holds nothing.
        m.start_worker("cpu:0")
        m.wait(lambda: len(c.scheduler_status()["workers"]) == 2 or None, timeout=30)
        assert c.describe_model("gg")["devices"] == ["cpu:1"]
        assert c.get_model("gg").generate(PROMPT, GREEDY)["choices"][0]["text"] == before
    finally:
        m.stop()


def test_an_instance_whose_name_a_live_process_holds_is_not_ready_until_the_broker_lets_it_join(tmp_path, tiny_models):
    """Another live process holds the instance's name at the broker, as an instance on a host cut off does until it
    expires: the new instance loads, the broker refuses its READY, and it reports `launching` ("joining the
    broker"), not `ready` with nothing routed to it. Once the holder leaves, it joins at its next retry and serves.
    A liveness of 20 heartbeats (10 s): the instance gives up after 4 of them, far beyond a slow machine's load."""
    m = Mesh(tmp_path / "home", tmp_path, liveness=20).start_all()
    holder = m.raw_socket(m.service_key)
    acknowledged, release, released = threading.Event(), threading.Event(), threading.Event()

    def hold():
        """The holder, all on one thread: READY, then heartbeats as a live peer must, then DISCONNECT."""
        holder.send_multipart(wire.peer_ready("worker/cpu#gg/0"))
        next_beat = 0.0
        while not release.is_set():
            if time.monotonic() >= next_beat:
                holder.send_multipart(wire.HEARTBEAT_FRAMES)
                next_beat = time.monotonic() + m.liveness / 12
            if holder.poll(50) and holder.recv_multipart()[0] == wire.HEARTBEAT:
                acknowledged.set()  # the broker's answer to an accepted READY (and its heartbeats after)
        holder.send_multipart(wire.DISCONNECT_FRAMES)
        released.set()

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    try:
        assert acknowledged.wait(10)
        c = m.client
        c.register_model("LLM", llm_definition(tiny_models))
        c.launch_model(model_name="custom-llama-2", model_format="ggufv2", quantization="F32", model_uid="gg",
                       wait=False)
        m.wait(lambda: c.describe_model("gg")["stage"] == "joining the broker" or None, timeout=30)
        assert c.describe_model("gg")["state"] == "launching"
        assert "held by a live peer" in (m.home / "logs" / "worker-cpu-gg-0.log").read_text()
        release.set()
        assert released.wait(10)
        m.wait(lambda: c.describe_model("gg")["state"] == "ready" or None, timeout=30)
        assert c.get_model("gg").generate("hi", {"max_tokens": 2, "temperature": 0})["usage"]["completion_tokens"] == 2
    finally:
        release.set()
        t.join(10)
        holder.close()
        m.stop()

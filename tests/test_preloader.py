"""The host's preloader: one process imports the engines once, and each worker's fork server is forked from it.

Real processes: the test session's preloader (`zinfer preloader`, tests/mesh.py starts it with the first worker),
meshes whose workers ask it for their fork servers, and a worker it refuses, which starts its own."""

from __future__ import annotations

import json
import os
import socket
import sys

import psutil

from tests.conftest import llm_definition
from tests.mesh import REPO, Mesh, gone, session_preloader
from zinfer.services.worker.host import preloader

GREEDY = {"max_tokens": 8, "temperature": 0}


def events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def fork_server_origins(m: Mesh) -> list[str]:
    logs = m.home / "logs" / "worker-cpu.log" if m.env.get("ZINFER_LOG_STDERR") == "0" else m.log_dir / "worker_cpu.log"
    return [e["origin"] for e in events(logs) if e["event"] == "fork_server"]


def launched(m: Mesh, tiny_models) -> psutil.Process:
    """custom-llama-2 (llama.cpp) launched on the mesh and answering: its instance process."""
    m.client.register_model("LLM", llm_definition(tiny_models))
    m.client.launch_model(model_name="custom-llama-2", model_format="ggufv2", quantization="F32", model_uid="gg")
    assert m.client.get_model("gg").generate("Once upon a time", GREEDY)["choices"][0]["text"]
    return psutil.Process(m.client.describe_model("gg")["pids"][0])


def test_a_workers_fork_server_is_forked_by_the_preloader_in_the_workers_environment(tmp_path, tiny_models):
    m = Mesh(tmp_path / "home", tmp_path)
    m.env["ZINFER_LOG_STDERR"] = "0"  # the mesh's processes log to their files only; the preloader's to stderr
    m.start_all()
    try:
        instance = launched(m, tiny_models)
        server = instance.parent()
        assert fork_server_origins(m) == ["from the preloader"]
        # The instance's fork server is the preloader's child, not the worker's ...
        assert server.parent().cmdline()[-3:] == ["preloader", "--socket", session_preloader(m.env)]
        # ... in the worker's working directory, with the worker's stderr ...
        assert server.cwd() == str(REPO)
        assert os.readlink(f"/proc/{server.pid}/fd/2") == str(tmp_path / "worker_cpu.log")
        # ... and environment: the instance read ZINFER_LOG_STDERR=0 and logged to its file only.
        assert "instance_ready" in {e["event"] for e in events(m.home / "logs" / "worker-cpu-gg-0.log")}
        assert '"service": "worker/cpu#gg/0"' not in (tmp_path / "worker_cpu.log").read_text()
        # The worker killed: its instance ends (its pipe to the worker closes), then its fork server, which the
        # preloader reaps: no zombie is left of it. (The instance's exit may reach its fork server as it ends, so
        # the instance is left to init to reap, as with a worker's own fork server.)
        m.kill("worker/cpu")
        m.wait(lambda: not psutil.pid_exists(server.pid) or None, timeout=30)
        assert gone(instance.pid)
    finally:
        m.stop()


def test_a_fork_server_from_the_preloader_that_dies_is_replaced_by_the_workers_own(tmp_path, tiny_models):
    m = Mesh(tmp_path / "home", tmp_path).start_all()
    try:
        instance = launched(m, tiny_models)
        server = instance.parent()
        server.kill()  # its instance dies with it (PR_SET_PDEATHSIG) and is restarted by the worker
        m.wait(lambda: gone(instance.pid) or None, timeout=30)
        m.wait(lambda: (lambda d: d["state"] == "ready" and d["pids"][0] != instance.pid)(
            m.client.describe_model("gg")) or None, timeout=60)
        again = psutil.Process(m.client.describe_model("gg")["pids"][0])
        assert again.parent().ppid() == m.procs["worker/cpu"].pid  # the worker's own fork server now
        assert m.client.get_model("gg").generate("Once upon a time", GREEDY)["choices"][0]["text"]
        assert "fork_server_lost" in {e["event"] for e in events(tmp_path / "worker_cpu.log")}
    finally:
        m.stop()


def test_a_worker_the_preloader_refuses_starts_its_own_fork_server(tmp_path, tiny_models):
    m = Mesh(tmp_path / "home", tmp_path)
    m.env["PRELOADER_TEST_SETTING"] = "1"  # read by no one, but an import could have: the preloader refuses
    m.start_all()
    try:
        instance = launched(m, tiny_models)
        assert fork_server_origins(m) == [
            "its own: the preloader refused (an environment that differs in PRELOADER_TEST_SETTING)"]
        assert instance.parent().ppid() == m.procs["worker/cpu"].pid
    finally:
        m.stop()


def test_a_malformed_request_is_refused_and_the_preloader_serves_on(tmp_path):
    path = session_preloader(Mesh(tmp_path / "home", tmp_path).env)

    def ask(data: bytes, fds: list[int]) -> preloader.ForkServerAnswer:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(120)  # the preloader may still be importing
            s.connect(path)
            socket.send_fds(s, [data], fds)
            return msgspec_decode(s.recv(65536))

    assert "a malformed request" in ask(b"\x93not a request", []).refused
    r, w = os.pipe()
    try:
        request = preloader.ForkServerRequest(env=dict(os.environ), cwd=os.getcwd(), executable=sys.executable,
                                              version=sys.version, sys_path=list(sys.path))
        encoded = preloader._request_codec[0].encode(request)
        assert ask(encoded, [r, w]).refused == "expected 4 file descriptors, got 2"
    finally:
        os.close(r)
        os.close(w)
    # A caller that connects and sends nothing is dropped after a moment; the preloader answers the next one.
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as idle:
        idle.connect(path)
        assert "a malformed request" in ask(b"\xc1", []).refused


def msgspec_decode(data: bytes) -> preloader.ForkServerAnswer:
    return preloader._answer_codec[1].decode(data)


def test_the_variables_read_at_run_time_may_differ_and_any_other_is_named():
    own = {"PATH": "/bin", "HF_HUB_OFFLINE": "1"}
    request = preloader.ForkServerRequest(
        env={**own, "ZINFER_ENDPOINT": "tcp://127.0.0.1:1", "CUDA_VISIBLE_DEVICES": "3"},
        cwd="/", executable=sys.executable, version=sys.version, sys_path=list(sys.path))
    set_by_imports = {"KMP_INIT_AT_FORK": "FALSE"}  # what sklearn's import sets
    assert preloader.refusal(request, own, set_by_imports) == ""
    # A worker started by a process that made the same imports has the variable they set, with their value.
    request.env["KMP_INIT_AT_FORK"] = "FALSE"
    assert preloader.refusal(request, own, set_by_imports) == ""
    request.env["KMP_INIT_AT_FORK"] = "TRUE"
    request.env["HF_HUB_OFFLINE"] = "0"
    request.env["HF_ENDPOINT"] = "http://127.0.0.1:1"
    assert preloader.refusal(request, own, set_by_imports) == (
        "an environment that differs in HF_ENDPOINT, HF_HUB_OFFLINE, KMP_INIT_AT_FORK")
    request.sys_path = ["/elsewhere"]
    assert preloader.refusal(request, own, set_by_imports) == "another sys.path"
    request.executable = "/usr/bin/python2"
    assert preloader.refusal(request, own, set_by_imports).startswith("another Python (/usr/bin/python2")

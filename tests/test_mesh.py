"""The mesh with real processes on loopback: routing, streaming, death of a peer, broker restart, fuzzing."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from tests.mesh import REPO, Mesh, free_port
from zinfer.shared import keys, wire
from zinfer.shared import protocol as p
from zinfer.shared.errors import Unavailable


@pytest.fixture
def bus(tmp_path):
    """Broker, registry and a test peer ("testpeer") on the real runtime."""
    m = Mesh(tmp_path / "home", tmp_path)
    try:
        m.start_broker()
        m.start("registry", "registry")
        start_peer(m)
        m.wait_services({"registry", "testpeer"})
        yield m
    finally:
        m.stop()


def start_peer(m: Mesh) -> subprocess.Popen:
    log = open(m.log_dir / "testpeer.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "tests.peer", m.endpoint, "testpeer"], env=m.env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    m.procs["testpeer"] = proc
    return proc


def test_request_reaches_a_service_and_its_reply_returns(bus):
    assert isinstance(bus.client.call("registry", p.Ping(payload=b"hello")), p.Pong)
    assert bus.client.call("testpeer", p.Ping(payload=b"echo")).payload == b"echo"


def test_streamed_reply_arrives_in_order_and_ends(bus):
    chunks = list(bus.client.stream("testpeer", p.Ping(payload=b"stream:500")))
    assert [c.payload for c in chunks] == [str(i).encode() for i in range(500)]


def test_killed_service_fails_its_inflight_requests_quickly(bus):
    error, after = bus.kill_during_a_call("testpeer", sleep=60)
    assert "testpeer" in error and "before answering" in error
    assert after < bus.liveness  # within the liveness window (the socket closes at once)
    # The broker and the other services carry on.
    assert isinstance(bus.client.call("registry", p.Ping()), p.Pong)


def test_unknown_target_gets_an_error_not_a_hang(bus):
    with pytest.raises(Unavailable, match="nothing serves 'nobody'"):
        bus.client.call("nobody", p.Ping(), timeout=10)


def test_services_reregister_after_a_broker_restart(bus):
    bus.kill("broker")
    bus.start_broker()
    bus.wait_services({"registry", "testpeer"}, timeout=30)
    assert bus.client.call("testpeer", p.Ping(payload=b"back")).payload == b"back"


def test_ten_thousand_malformed_frames_leave_the_broker_serving(bus):
    """Hostile frames from keys the broker accepts: a client key, and the service key (which may register)."""
    rng = random.Random(1234)
    socks = [bus.raw_socket(bus.admin_key), bus.raw_socket(bus.service_key)]
    commands = [wire.READY, wire.BIND, wire.UNBIND, wire.HEARTBEAT, wire.DISCONNECT, wire.REQUEST, wire.CANCEL,
                wire.PARTIAL, wire.REPLY, wire.DENIED, wire.PROTO + b"\xff", b"", b"ZINF1\x10"]
    for i in range(10_000):
        kind = i % 4
        if kind == 0:  # pure noise
            frames = [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 6))]
        elif kind == 1:  # right header, random command and junk
            frames = [rng.choice(commands)] + [rng.randbytes(rng.randint(0, 16)) for _ in range(rng.randint(0, 4))]
        elif kind == 2:  # replies for clients and requests that do not exist
            frames = [wire.REPLY, rng.randbytes(5), rng.randbytes(8), rng.randbytes(20)]
        else:  # requests to random targets with garbage bodies
            frames = [wire.REQUEST, rng.choice([b"registry", b"testpeer", rng.randbytes(4)]),
                      rng.randbytes(8), rng.randbytes(rng.randint(0, 40))]
        socks[i % 2].send_multipart(frames)
    for sock in socks:
        sock.close()
    bus.wait(lambda: bus.client.call("testpeer", p.Ping(payload=b"alive")).payload == b"alive" or None)
    assert bus.procs["broker"].poll() is None
    assert isinstance(bus.client.call("registry", p.Ping()), p.Pong)
    assert {"registry", "testpeer"} <= bus.services()


def test_ipc_endpoint_works(tmp_path):
    m = Mesh(tmp_path / "home", tmp_path)
    m.endpoint = f"ipc://{tmp_path}/zinfer.sock"
    m.env["ZINFER_ENDPOINT"] = m.endpoint
    m.client = m.new_client(timeout=10)
    try:
        m.start_broker()
        m.start("registry", "registry")
        m.wait_services({"registry"})
        assert isinstance(m.client.call("registry", p.Ping()), p.Pong)
    finally:
        m.stop()


def _zinfer(*args, env=None, timeout=60, input=None):
    return subprocess.run([sys.executable, "-m", "zinfer", *args], capture_output=True, text=True, cwd=REPO,
                          env=env or os.environ, timeout=timeout, input=input)


def test_zinfer_up_then_status(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, ZINFER_HOME=str(tmp_path), ZINFER_ENDPOINT=endpoint, HF_HUB_OFFLINE="1",
               ZINFER_GATEWAY_PORT=str(free_port()))
    up = subprocess.Popen([sys.executable, "-m", "zinfer", "up"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        for line in up.stdout:
            if "zinfer is up" in line or time.monotonic() > deadline:
                break
        out = _zinfer("status", env=env)
        assert out.returncode == 0, out.stderr
        for needle in ("registry", "scheduler", "worker/cpu", "cpu"):
            assert needle in out.stdout
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{env['ZINFER_GATEWAY_PORT']}/ready", timeout=10) as ready:
            assert b'"ready":true' in ready.read()  # the gateway came up with the rest
        # A process that dies is started again, and the run file names the new one.
        from zinfer.cli import runfile

        first = next(c.pid for c in runfile.read(tmp_path).children if c.args == ["registry"])
        os.kill(first, 9)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pids = [c.pid for c in (runfile.read(tmp_path) or runfile.UpRecord(pid=0, started=0, endpoint="")).children
                    if c.args == ["registry"]]
            if pids and pids[0] != first and "registry" in _zinfer("status", env=env).stdout:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the registry was not started again")
    finally:
        up.send_signal(2)  # Ctrl-C stops every child
        up.wait(timeout=30)
    assert up.returncode == 0
    # Nothing is left listening.
    assert _zinfer("status", "--timeout", "1", env=env).returncode == 1


def test_unreachable_endpoint_is_one_line_and_exit_1(tmp_path):
    keys.init_keys(tmp_path)
    out = _zinfer("status", "-e", f"tcp://127.0.0.1:{free_port()}", env=dict(os.environ, ZINFER_HOME=str(tmp_path)))
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "no zinfer broker answers" in out.stderr
    assert "Traceback" not in out.stderr


def test_port_in_use_is_one_line_and_exit_1(tmp_path):
    import socket

    keys.init_keys(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        out = _zinfer("broker", "-e", f"tcp://127.0.0.1:{s.getsockname()[1]}",
                      env=dict(os.environ, ZINFER_HOME=str(tmp_path)))
    assert out.returncode == 1
    assert "cannot listen" in out.stderr and "Traceback" not in out.stderr


def test_bad_endpoint_setting_is_one_line():
    out = _zinfer("status", "-e", "http://localhost:9997")
    assert out.returncode == 1 and "endpoint" in out.stderr and "Traceback" not in out.stderr

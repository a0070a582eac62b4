"""The trust boundary, attack by attack, against real mesh processes: each attack fails safely.

The mesh here runs with the operator policy `trust_remote_code_models = ["trusted-code"]`, so the remote-code
attack is shown both ways: refused for any other model, and really executed for the one an operator allowed
(which proves the attack file would run if the policy let it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import msgspec
import psutil
import pytest
import zmq

from tests.conftest import embedding_definition, llm_definition
from tests.mesh import REPO, Mesh
from tests.test_mesh import start_peer
from tests.test_protocol import nested_bomb
from zinfer.shared import instances, keys, wire
from zinfer.shared import protocol as p
from zinfer.shared.client import Client
from zinfer.shared.errors import Forbidden, InvalidRequest, TooLarge, Unauthenticated

MARKER = "zinfer-secret-marker-7f3a"
EVIL_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("the model folder's code ran")
from transformers import LlamaConfig as EvilConfig  # noqa
from transformers import LlamaForCausalLM as EvilModel  # noqa
"""


def evil_model_folder(tiny_models, root, name: str):
    """The tiny Llama, with a config.json whose auto_map points at a .py file in the folder."""
    folder = root / name
    shutil.copytree(tiny_models["pytorch"], folder)
    marker = root / f"{name}.ran"
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


@pytest.fixture(scope="module")
def secure(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("security")
    config = root / "zinfer.toml"
    config.write_text('trust_remote_code_models = ["trusted-code"]\n')
    m = Mesh(root / "home", root)
    m.env.update(ZINFER_CONFIG=str(config))
    m.start_all()
    start_peer(m)
    m.wait_services({"testpeer"})
    c = m.client
    c.register_model("LLM", llm_definition(tiny_models))
    c.register_model("embedding", embedding_definition(tiny_models))
    c.launch_model(model_name="custom-llama-2", model_format="ggufv2", model_uid="gg")
    c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="emb")
    m.root = root
    yield m
    m.stop()


def no_reply(sock: zmq.Socket, wait_s: float = 1.0) -> bool:
    return not sock.poll(int(wait_s * 1000))


def recv_reply(sock: zmq.Socket, timeout_s: float = 10.0):
    assert sock.poll(int(timeout_s * 1000)), "no reply"
    frames = sock.recv_multipart()
    return frames[0], p.decode_reply(frames[2])


# ---------------------------------------------------------------- who may connect


def test_unauthenticated_connect_gets_nothing(secure, tmp_path):
    # A socket without CURVE, and one with a key the broker never issued: no handshake, no reply.
    plain = secure.raw_socket(None)
    stranger_file = tmp_path / "stranger.key_secret"
    public, secret = zmq.curve_keypair()
    keys.write_key_file(stranger_file, "stranger", "admin", public, secret, keys.broker_public_key(secure.home))
    stranger = secure.raw_socket(stranger_file)
    for sock in (plain, stranger):
        try:  # queued until the handshake fails; after that there is no connection to queue for
            sock.send_multipart(wire.client_request(b"registry", b"x" * 8, p.encode(p.Ping())), zmq.NOBLOCK)
        except zmq.Again:
            pass
        assert no_reply(sock)
        sock.close()
    # The client library says so in one line, quickly, naming the key file; never a hang.
    start = time.monotonic()
    with pytest.raises(Unauthenticated, match="refused key 'stranger'.*stranger.key_secret"):
        Client(secure.endpoint, key=stranger_file, timeout=5).list_models()
    assert time.monotonic() - start < 3
    with pytest.raises(Unauthenticated, match="no client key: tried .*nowhere.key_secret"):
        Client(secure.endpoint, key=tmp_path / "nowhere.key_secret").list_models()
    # And the CLI: one line, exit code 1.
    env = dict(secure.env, ZINFER_CLIENT_KEY=str(stranger_file))
    out = subprocess.run([sys.executable, "-m", "zinfer", "list"], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "refused key 'stranger'" in out.stderr


def test_a_user_key_cannot_register_launch_terminate_or_unregister(secure, tiny_models):
    user = secure.new_client(key=secure.user_key)
    for attempt in (
        lambda: user.register_model("LLM", llm_definition(tiny_models, "sneaky")),
        lambda: user.launch_model(model_name="custom-llama-2", model_format="ggufv2", model_uid="sneaky"),
        lambda: user.terminate_model("gg"),
        lambda: user.unregister_model("LLM", "custom-llama-2"),
    ):
        with pytest.raises(Forbidden, match="keys with the user role may not send"):
            attempt()
    # What a user may do still works.
    assert user.list_models()["gg"]["state"] == "ready"
    assert {r["model_name"] for r in user.list_model_registrations("LLM")} >= {"custom-llama-2"}
    out = user.get_model("gg").generate("hello", {"max_tokens": 3, "temperature": 0})
    assert out["usage"]["completion_tokens"] == 3
    assert len(user.get_model("emb").create_embedding("hi")["data"][0]["embedding"]) == 384
    assert "sneaky" not in secure.client.list_models()


def test_a_client_key_cannot_register_as_a_service(secure):
    for key_file in (secure.user_key, secure.admin_key):
        sock = secure.raw_socket(key_file)
        sock.send_multipart(wire.peer_ready("registry"))
        frames = sock.recv_multipart() if sock.poll(5000) else []
        assert frames[:1] == [wire.DENIED] and b"cannot register a service" in frames[1]
        sock.close()
    assert [peer["key"] for peer in secure.client.broker_status()["peers"] if peer["service"] == "registry"] \
        == ["service"]


def test_a_live_service_name_cannot_be_taken(secure, tiny_models):
    rogue = secure.raw_socket(secure.service_key)  # even with the service key itself
    rogue.send_multipart(wire.peer_ready("registry"))
    frames = rogue.recv_multipart() if rogue.poll(5000) else []
    assert frames[:1] == [wire.DENIED] and b"held by a live peer" in frames[1]
    # Registrations keep reaching the real registry; the rogue sees none of them.
    secure.client.register_model("embedding", embedding_definition(tiny_models, "captured-maybe"))
    secure.client.unregister_model("embedding", "captured-maybe")
    assert no_reply(rogue, 0.5)
    rogue.close()
    assert sum(1 for peer in secure.client.broker_status()["peers"] if peer["service"] == "registry") == 1


def test_forged_replies_never_reach_a_client(secure):
    """An attacker that learned a client's routing id and request ids (by serving it once) forges replies to
    its next request, from a registered peer and from an unregistered socket: the client gets the real one."""
    evil = secure.raw_socket(secure.service_key)
    evil.send_multipart(wire.peer_ready("evil"))
    stray = secure.raw_socket(secure.user_key)
    learned = {}
    forge, done = threading.Event(), threading.Event()
    forged = p.encode(p.Pong(payload=b"forged"))

    def run_evil():
        """The evil peer, all on one thread (a zmq socket is not thread-safe). Broker heartbeats arrive among the
        requests, and it heartbeats as a live service must: in CI a heartbeat once came before the request, the
        peer took it for one and stopped, and the broker dropped it after the mesh's 3 s liveness."""
        next_beat = 0.0
        while not done.is_set():
            if time.monotonic() >= next_beat:
                evil.send_multipart(wire.HEARTBEAT_FRAMES)
                next_beat = time.monotonic() + secure.liveness / 12
            if evil.poll(50):
                frames = evil.recv_multipart()
                if frames[0] == wire.REQUEST and not learned:
                    learned.update(client=frames[1], req_id=frames[2], caller=frames[3])
                    evil.send_multipart(wire.peer_reply(frames[1], frames[2], p.encode(p.Pong(payload=b"evil-ok"))))
            if forge.is_set():
                for req_id in next_req_ids():
                    evil.send_multipart(wire.peer_reply(learned["client"], req_id, forged))

    def next_req_ids():
        counter = int.from_bytes(learned["req_id"][4:], "big")
        return [learned["req_id"][:4] + n.to_bytes(8, "big") for n in range(counter + 1, counter + 4)]

    t = threading.Thread(target=run_evil)
    t.start()
    try:
        secure.wait_services({"evil"})
        victim = secure.new_client(key=secure.user_key, timeout=20)
        assert victim.call("evil", p.Ping(payload=b"hi")).payload == b"evil-ok"
        assert learned["caller"] == b"user user"  # stamped by the broker: the victim's role and key name
        result = {}
        slow = threading.Thread(target=lambda: result.update(
            reply=victim.call("testpeer", p.Ping(payload=b"sleep:1.5"))))
        slow.start()
        forge.set()
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            for req_id in next_req_ids():
                stray.send_multipart(wire.peer_reply(learned["client"], req_id, forged))
            time.sleep(0.05)
        slow.join()
        assert result["reply"].payload == b"slept"
        # It forged as a live, registered peer throughout.
        assert "evil" in {peer["service"] for peer in secure.client.broker_status()["peers"]}
    finally:
        done.set()
        t.join()
    evil.send_multipart(wire.DISCONNECT_FRAMES)
    evil.close()
    stray.close()


def test_the_heartbeats_an_unknown_peer_queued_get_one_disconnect(secure):
    """A peer whose broker restarted within the liveness window never noticed it was gone: the heartbeats it
    queued meanwhile arrive at the new broker all at once. It is asked to register again once, not once per
    heartbeat (each READY after the first would fail the requests it had taken: "re-registered")."""
    peer = secure.raw_socket(secure.service_key)
    try:
        for _ in range(6):
            peer.send_multipart(wire.HEARTBEAT_FRAMES)
        replies = []
        while peer.poll(1000):  # the broker heartbeats registered peers only: this hears its answers alone
            replies.append(peer.recv_multipart())
        assert replies == [wire.DISCONNECT_FRAMES]
    finally:
        peer.close()


def test_a_fake_worker_report_is_refused(secure):
    fake = p.WorkerReport(device=instances.DeviceInfo(worker_id="fake", host="attacker", device="cpu:9",
                                              total_memory=2**50, free_memory=2**50))
    service_client = Client(secure.endpoint, key=secure.service_key)  # the service key, but not that worker
    for client in (secure.client, secure.new_client(key=secure.user_key), service_client):
        with pytest.raises(Forbidden):
            client.call(p.SCHEDULER, fake)
    assert [w["worker_id"] for w in secure.client.scheduler_status()["workers"]] == ["cpu"]
    service_client.close()


# ---------------------------------------------------------------- no code from a request


def test_trust_remote_code_from_a_launch_is_refused_and_the_file_never_runs(secure, tiny_models):
    c = secure.client
    folder, marker = evil_model_folder(tiny_models, secure.root, "evil-code")
    c.register_model("LLM", llm_definition(tiny_models, "evil-code", model_specs=[
        {"model_format": "pytorch", "model_size_in_billions": 1, "quantizations": ["none"],
         "model_uri": str(folder)}]))
    with pytest.raises(Forbidden, match="trust_remote_code.*trust_remote_code_models"):
        c.launch_model(model_name="evil-code", model_format="pytorch", trust_remote_code=True)
    # Straight to the worker, skipping the scheduler: refused too (workers take loads from the scheduler only).
    spec = p.LLMSpec(model_format="pytorch", model_size_in_billions=1, quantizations=["none"], model_uri=str(folder))
    family = msgspec.convert(llm_definition(tiny_models, "evil-code"), p.LLMFamily)
    load = p.LoadInstance(model_uid="direct", model_type="LLM", llm=family, spec=spec, quantization="none",
                          options=p.EngineOptions(trust_remote_code=True))
    with pytest.raises(Forbidden, match="the admin role may not send LoadInstance"):
        c.call(p.worker_service("cpu"), load)
    with pytest.raises(Forbidden, match="from the scheduler only"):  # the service key, not the scheduler
        Client(secure.endpoint, key=secure.service_key).call(p.worker_service("cpu"), load)
    # Launched without it, the model loads with transformers' own Llama code: the folder's file is not run.
    c.launch_model(model_name="evil-code", model_format="pytorch", model_uid="evil-plain")
    assert c.get_model("evil-plain").generate("hi", {"max_tokens": 2, "temperature": 0})["usage"]
    c.terminate_model("evil-plain")
    assert not marker.exists()
    # The attack is real: for the one model the operator allowed, the same kind of folder's code does run.
    trusted, trusted_marker = evil_model_folder(tiny_models, secure.root, "trusted-code")
    c.register_model("LLM", llm_definition(tiny_models, "trusted-code", model_specs=[
        {"model_format": "pytorch", "model_size_in_billions": 1, "quantizations": ["none"],
         "model_uri": str(trusted)}]))
    try:
        c.launch_model(model_name="trusted-code", model_format="pytorch", model_uid="trusted")
    finally:
        c.terminate_model("trusted")
    assert trusted_marker.exists()
    assert not marker.exists()


def test_unknown_engine_options_are_refused_by_name(secure):
    with pytest.raises(InvalidRequest, match="contineous_batching"):
        secure.client.launch_model(model_name="custom-llama-2", model_format="ggufv2", contineous_batching=True)
    assert "custom-llama-2" not in secure.client.list_models()


# ---------------------------------------------------------------- hostile input


def test_nested_msgpack_leaves_every_service_answering(secure):
    sock = secure.raw_socket(secure.admin_key)
    targets = [b"registry", b"scheduler", b"worker/cpu", p.model_target("gg").encode(), b"testpeer"]
    for i, target in enumerate(targets):
        sock.send_multipart(wire.client_request(target, i.to_bytes(8, "big"), nested_bomb()))
    codes = {}
    for _ in targets:
        _cmd, reply = recv_reply(sock)
        codes[reply.code] = codes.get(reply.code, 0) + 1
    assert codes == {"protocol": len(targets)}
    sock.close()
    for target in ("registry", "scheduler", "worker/cpu", "testpeer"):
        assert isinstance(secure.client.call(target, p.Ping()), p.Pong)
    assert secure.client.get_model("gg").generate("hi", {"max_tokens": 2, "temperature": 0})["usage"]


def test_a_100_mb_frame_leaves_every_service_answering(secure):
    big = b"\0" * (100 * 2**20)
    sock = secure.raw_socket(secure.admin_key)
    sock.send_multipart(wire.client_request(b"registry", b"b" * 8, big))
    sock.send_multipart(wire.client_request(b"nobody-serves-this", b"c" * 8, big))
    assert no_reply(sock, 1.0)  # over max_message_mb: the broker drops that connection, answers nothing
    sock.close()
    broker = psutil.Process(secure.procs["broker"].pid)
    assert broker.memory_info().rss < 400 * 2**20  # nothing of it is parked
    for target in ("registry", "scheduler", "worker/cpu", "testpeer"):
        assert isinstance(secure.client.call(target, p.Ping()), p.Pong)
    # The client library refuses such a message before sending it, with the limit.
    with pytest.raises(TooLarge, match="limited to 64 MiB"):
        secure.client.call("registry", p.Ping(payload=big))


def test_parked_requests_are_bounded(secure):
    """Requests for a target nobody serves are held for a while, but only up to the count and byte bounds."""
    sock = secure.raw_socket(secure.user_key)
    body = p.encode(p.Ping(payload=b"\0" * 2**20))
    start = time.monotonic()
    for i in range(80):  # 80 MiB against park_max_mb = 64
        sock.send_multipart(wire.client_request(b"nobody-serves-this", i.to_bytes(8, "big"), body))
    _cmd, reply = recv_reply(sock)
    assert isinstance(reply, p.Error) and "queue for such requests is full" in reply.message
    assert time.monotonic() - start < 1.5  # at once, not after the 2 s grace
    assert secure.client.broker_status()["parked"] <= 64
    sock.close()


def test_the_template_attack_is_refused_at_once(secure, tiny_models):
    d = llm_definition(tiny_models, "template-bomb")
    d["model_specs"][1]["model_file_name_template"] = "{quantization}{quantization:>300000000}"
    registry = psutil.Process(secure.procs["registry"].pid)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        with pytest.raises(InvalidRequest, match=r"model_specs\[1\].model_file_name_template.*no other fields"):
            secure.client.register_model("LLM", d)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.010  # the best of five round trips; the attack once took seconds and 900 MB
    assert registry.memory_info().rss < 600 * 2**20
    for template in ("{quantization!r}.gguf", "{0}.{quantization}.gguf", "x.{quantization}.{{gguf}}"):
        d["model_specs"][1]["model_file_name_template"] = template
        with pytest.raises(InvalidRequest, match="model_file_name_template"):
            secure.client.register_model("LLM", d)


def test_names_must_match_in_full(secure, tiny_models):
    for name in ("name\n", "name\nx", "ok name"):
        with pytest.raises(InvalidRequest, match="model_name"):
            secure.client.register_model("LLM", llm_definition(tiny_models, name))
    with pytest.raises(InvalidRequest, match="model_uid"):
        secure.client.launch_model(model_name="custom-llama-2", model_format="ggufv2", model_uid="uid\n")


# ---------------------------------------------------------------- keys


def test_a_revoked_key_is_refused_without_a_restart(secure):
    keys.create_client_key(secure.home, "temp-user", "user")
    key_file = keys.client_key_path(secure.home, "temp-user")
    live = secure.new_client(key=key_file)
    assert "gg" in live.list_models()
    out = subprocess.run([sys.executable, "-m", "zinfer", "keys", "revoke", "temp-user"], capture_output=True,
                         text=True, cwd=REPO, env=secure.env, timeout=60)
    assert out.returncode == 0, out.stderr

    def refused():
        try:
            live.list_models()
        except Unauthenticated as exc:
            return str(exc)
        return None

    assert "revoked" in secure.wait(refused, timeout=10)  # the live connection is cut off...
    with pytest.raises(Unauthenticated, match="refused key 'temp-user'"):
        Client(secure.endpoint, key=key_file).list_models()  # ...and new ones are refused at the handshake
    assert secure.client.list_models()["gg"]["state"] == "ready"  # nobody else is affected


def test_keys_cli_create_list_and_file_modes(secure):
    def zinfer(*args):
        return subprocess.run([sys.executable, "-m", "zinfer", *args], capture_output=True, text=True, cwd=REPO,
                              env=secure.env, timeout=60)

    out = zinfer("keys", "create", "alice", "--role", "user")
    assert out.returncode == 0 and "alice.key_secret" in out.stdout
    listed = json.loads(zinfer("keys", "list", "--json").stdout)
    assert {"broker", "service", "admin", "user", "alice"} - {"broker"} <= {k["name"] for k in listed}
    assert next(k for k in listed if k["name"] == "alice")["role"] == "user"
    assert zinfer("keys", "create", "alice").returncode == 1  # names are unique
    assert zinfer("keys", "create", "bob", "--role", "root").returncode == 1
    folder = keys.keys_dir(secure.home)
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    for path in folder.rglob("*"):
        if path.is_file():
            assert oct(path.stat().st_mode & 0o777) == "0o600", path
    alice = Client(secure.endpoint, key=keys.client_key_path(secure.home, "alice"))
    assert "gg" in alice.list_models()
    with pytest.raises(Forbidden):
        alice.terminate_model("gg")


# ---------------------------------------------------------------- logs


def test_no_prompt_or_input_text_in_any_log(secure):
    gg, emb = secure.client.get_model("gg"), secure.client.get_model("emb")
    gg.generate(f"{MARKER} tell me", {"max_tokens": 4, "temperature": 0})
    list(gg.chat([{"role": "user", "content": MARKER}], {"max_tokens": 4, "stream": True}))
    emb.create_embedding([MARKER, f"more {MARKER}"])
    with pytest.raises(TooLarge):  # a refusal on the worker, with the prompt in hand
        gg.generate(MARKER * 2000, {"max_tokens": 2})
    checked = 0
    for log_file in secure.log_dir.glob("*.log"):  # PYTHONUNBUFFERED: each line is written as it is logged
        text = log_file.read_text(errors="replace")
        assert MARKER not in text, log_file.name
        # Every JSON line from every thread names its service and process.
        for line in text.splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                assert "service" in event and "pid" in event, (log_file.name, line)
                checked += 1
    assert checked > 20  # broker, registry, scheduler, worker and the test peer all logged


LOG_SCRIPT = """
import threading
from zinfer.shared.logs import configure_logging
log = configure_logging("probe")
def handler(prompt):
    secret = prompt.upper()
    raise ValueError("boom")
try:
    handler("{marker}")
except ValueError:
    log.exception("handler_failed")
t = threading.Thread(target=lambda: log.info("from_thread"))
t.start(); t.join()
"""


def test_logged_exceptions_carry_no_local_variables():
    out = subprocess.run([sys.executable, "-c", LOG_SCRIPT.format(marker=MARKER.lower())], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert "handler_failed" in out.stderr and "ValueError" in out.stderr
    assert MARKER.lower() not in out.stderr and MARKER.upper() not in out.stderr
    events = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    thread_line = next(e for e in events if e["event"] == "from_thread")
    assert thread_line["service"] == "probe" and thread_line["pid"] > 0


def test_a_rerank_model_the_operator_trusts_launches_with_trust_remote_code(secure, tiny_models):
    """Issue 32: the worker read `(msg.llm or msg.embedding).model_name` before loading, an AttributeError (an
    internal error) for every rerank launch the scheduler let through with trust_remote_code."""
    from tests.conftest import rerank_definition

    c = secure.client
    c.register_model("rerank", rerank_definition(tiny_models, "trusted-code"))
    try:
        uid = c.launch_model(model_name="trusted-code", model_type="rerank", model_uid="rr-trusted",
                             trust_remote_code=True)
        assert len(c.get_model(uid).rerank(["a whale", "a fox"], "whales")["results"]) == 2
        c.terminate_model(uid)
    finally:
        c.unregister_model("rerank", "trusted-code")

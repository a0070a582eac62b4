"""Workers on other hosts: network namespaces on this machine stand for hosts (issue 13).

    core      broker, registry, scheduler        10.N.0.1  (its own ZINFER_HOME with every key; the registry does
                                                           not see the `only-b` folder)
    host-a    a CPU worker, hostname host-a      10.N.0.2  (a ZINFER_HOME holding only its imported bundle)
    host-b    a CPU worker, hostname host-b      10.N.0.3  (likewise; the only host with the `only-b` models)
    stranger  a peer with a key of its own       10.N.0.4
    (this test process reaches the broker from 10.N.0.254)

One bridge in `core` joins them; every packet stays on these private test addresses. Each host runs in its own
UTS namespace (its own host name) and mount namespace (host-a cannot see the folder only host-b has). Needs root
and `ip` (iproute2); skips with the reason otherwise.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import embedding_definition, llm_definition
from tests.mesh import REPO, free_port
from zinfer.shared import keys
from zinfer.shared.client import Client
from zinfer.shared.errors import InvalidRequest, NotFound, Unavailable, ZinferError

HEARTBEAT, LIVENESS = 0.5, 6  # 3 s without a heartbeat: declared gone
PROMPT = "What is the largest animal in the world?"
FOUR_GREEDY = {"max_tokens": 4, "temperature": 0}  # sampled, the tiny Llama ends early now and then (EOS)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc


class Net:
    """The namespaces, the bridge, the veth pairs; removed by close()."""

    HOSTS = ("core", "host-a", "host-b", "stranger")

    def __init__(self):
        tag = f"{os.getpid() % 100000:05d}"
        self.tag = tag
        self.ns = {h: f"zt{tag}-{h}" for h in self.HOSTS}
        taken = sh("ip", "-4", "route").stdout
        self.net = next(f"10.{n}.0" for n in random.sample(range(100, 250), 150) if f"10.{n}." not in taken)
        self.ip = {"core": f"{self.net}.1", "host-a": f"{self.net}.2", "host-b": f"{self.net}.3",
                   "stranger": f"{self.net}.4", "test": f"{self.net}.254"}
        self.root_veth = f"zt{tag}r"
        self.port_of: dict[str, str] = {}
        try:
            for name in self.ns.values():
                sh("ip", "netns", "add", name)
            core = self.ns["core"]
            self.exec_in("core", "ip", "link", "add", "br0", "type", "bridge")
            self.exec_in("core", "ip", "addr", "add", f"{self.ip['core']}/24", "dev", "br0")
            self.exec_in("core", "ip", "link", "set", "br0", "up")
            self.exec_in("core", "ip", "link", "set", "lo", "up")
            for i, host in enumerate(("host-a", "host-b", "stranger")):
                port, inner = f"zt{tag}p{i}", f"zt{tag}h{i}"
                sh("ip", "link", "add", port, "type", "veth", "peer", "name", inner)
                sh("ip", "link", "set", port, "netns", core)
                sh("ip", "link", "set", inner, "netns", self.ns[host])
                self.exec_in("core", "ip", "link", "set", port, "master", "br0")
                self.exec_in("core", "ip", "link", "set", port, "up")
                self.exec_in(host, "ip", "addr", "add", f"{self.ip[host]}/24", "dev", inner)
                self.exec_in(host, "ip", "link", "set", inner, "up")
                self.exec_in(host, "ip", "link", "set", "lo", "up")
                self.port_of[host] = port
            sh("ip", "link", "add", self.root_veth, "type", "veth", "peer", "name", f"zt{tag}c")
            sh("ip", "link", "set", f"zt{tag}c", "netns", core)
            self.exec_in("core", "ip", "link", "set", f"zt{tag}c", "master", "br0")
            self.exec_in("core", "ip", "link", "set", f"zt{tag}c", "up")
            sh("ip", "addr", "add", f"{self.ip['test']}/24", "dev", self.root_veth)
            sh("ip", "link", "set", self.root_veth, "up")
        except Exception:
            self.close()
            raise

    def exec_in(self, host: str, *args: str) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns[host], *args)

    def link(self, host: str, up: bool) -> None:
        """Pull (or plug back) the host's cable: its port on the bridge goes down."""
        self.exec_in("core", "ip", "link", "set", self.port_of[host], "up" if up else "down")

    def close(self) -> None:
        sh("ip", "link", "del", self.root_veth, check=False)
        for name in self.ns.values():
            sh("ip", "netns", "del", name, check=False)


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    if not shutil.which("ip") or not shutil.which("unshare"):
        return "needs iproute2's `ip` and util-linux's `unshare`"
    probe = f"zt-probe-{os.getpid()}"
    made = sh("ip", "netns", "add", probe, check=False)
    sh("ip", "netns", "del", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    return None


class Hosts:
    """The mesh across the namespaces: core services, two worker hosts, and the processes' teardown."""

    def __init__(self, root: Path, models: dict[str, Path]):
        self.root = root
        self.net = Net()
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.endpoint = f"tcp://{self.net.ip['core']}:{self.port}"
        self.core_home = root / "core-home"
        keys.init_keys(self.core_home)
        self.homes = {}
        for host in ("host-a", "host-b"):
            home = root / f"{host}-home"
            bundle = root / f"{host}.bundle"
            # The commands docs/scale.md gives: export on the head, import on the host (nothing else in its home).
            for args, at in ((["export", host, "-o", str(bundle)], self.core_home), (["import", str(bundle)], home)):
                subprocess.run([sys.executable, "-m", "zinfer", "keys", *args, "--home", str(at)], cwd=REPO, check=True,
                               capture_output=True, timeout=60)
            bundle.unlink()
            held = {f.name for f in home.rglob("*") if f.is_file()}
            assert not any("broker.key_secret" in name or "admin" in name for name in held), held
            self.homes[host] = home
        # Files only host-b has: a copy of the GGUF folder that host-a's mount namespace hides.
        self.only_b = root / "only-b"
        shutil.copytree(models["gguf_dir"], self.only_b / "gguf")
        self.env = dict(os.environ, ZINFER_ENDPOINT=self.endpoint, ZINFER_HEARTBEAT_INTERVAL=str(HEARTBEAT),
                        ZINFER_HEARTBEAT_LIVENESS=str(LIVENESS), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                        PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", ZINFER_DIE_WITH_PARENT="1",
                        PYTHONPATH=str(REPO))

    def start(self, host: str, name: str, args: list[str], home: Path, hostname: str | None = None,
              hide: Path | None = None) -> subprocess.Popen:
        """`python -m cli ARGS` inside the host's namespace (its own host name and mounts when given)."""
        prelude = []
        if hide is not None:
            prelude.append(f"mount -t tmpfs none {hide}")
        if hostname is not None:
            prelude.append(f"hostname {hostname}")
        script = " && ".join([*prelude, 'exec "$0" "$@"'])
        cmd = ["ip", "netns", "exec", self.net.ns[host]]
        if prelude:
            cmd += ["unshare", "--uts", "--mount", "--propagation", "private"]
        cmd += ["sh", "-c", script, sys.executable, "-m", "zinfer", *args]
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(cmd, cwd=REPO, env={**self.env, "ZINFER_HOME": str(home)}, stdout=log,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start_worker(self, host: str) -> subprocess.Popen:
        return self.start(host, f"worker-{host}", ["worker", "--device", "cpu"], self.homes[host],
                          hostname=host, hide=self.only_b if host == "host-a" else None)

    def client(self, timeout: float = 20.0) -> Client:
        return Client(self.endpoint, timeout=timeout, key=keys.client_key_path(self.core_home, "admin"))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()
        self.net.close()


def wait_for(probe, timeout: float = 60, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = probe()
        except ZinferError:
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"waited {timeout}s for {getattr(probe, '__name__', probe)}"
        time.sleep(interval)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, tiny_models):
    why = _can_make_namespaces()
    if why:
        pytest.skip(why)
    h = Hosts(tmp_path_factory.mktemp("multihost"), tiny_models)
    try:
        h.start("core", "broker", ["broker"], h.core_home)
        h.start("core", "registry", ["registry"], h.core_home, hide=h.only_b)  # only host-b has that folder
        h.start("core", "scheduler", ["scheduler"], h.core_home)
        for host in ("host-a", "host-b"):
            h.start_worker(host)
        h.c = h.client()
        wait_for(lambda: len(h.c.scheduler_status()["workers"]) == 2)
        yield h
    finally:
        h.close()


def test_workers_on_two_hosts_join_with_their_bundles_and_serve_both(hosts, tiny_models):
    c = hosts.c
    workers = {w["worker_id"]: w for w in c.scheduler_status()["workers"]}
    assert set(workers) == {"host-a/cpu", "host-b/cpu"}  # HOST/DEVICE: a remote broker, so the host is named
    assert workers["host-a/cpu"]["host"] == "host-a" and workers["host-a/cpu"]["address"] == hosts.net.ip["host-a"]
    assert workers["host-b/cpu"]["address"] == hosts.net.ip["host-b"]
    c.register_model("LLM", llm_definition(tiny_models))
    c.register_model("embedding", embedding_definition(tiny_models))
    uid = c.launch_model(model_name="custom-llama-2", model_format="ggufv2", replica=2, model_uid="both")
    view = c.describe_model(uid)
    assert sorted(view["devices"]) == ["host-a/cpu", "host-b/cpu"] and sorted(view["hosts"]) == ["host-a", "host-b"]
    # Generate and embed on each host (pinned by worker_ip, as Xinference's), the same answers on both.
    answers = set()
    for host in ("host-a", "host-b"):
        gen = c.launch_model(model_name="custom-llama-2", model_format="ggufv2", worker_ip=hosts.net.ip[host],
                             model_uid=f"gen-{host}")
        emb = c.launch_model(model_name="custom-bge-base-en", model_type="embedding", worker_ip=host,
                             model_uid=f"emb-{host}")
        assert c.describe_model(gen)["devices"] == [f"{host}/cpu"]
        answers.add(c.get_model(gen).generate(PROMPT, {"max_tokens": 12, "temperature": 0})["choices"][0]["text"])
        vector = c.get_model(emb).create_embedding("the blue whale")["data"][0]["embedding"]
        assert len(vector) == 384
    assert len(answers) == 1
    both = [c.get_model(uid).generate(PROMPT, {"max_tokens": 12, "temperature": 0}) for _ in range(4)]
    assert {b["choices"][0]["text"] for b in both} == answers


def test_files_are_resolved_on_each_workers_host(hosts, tiny_models):
    c = hosts.c
    definition = llm_definition(tiny_models, "only-on-b")
    spec = definition["model_specs"][1]
    spec["model_uri"] = f"file://{hosts.only_b / 'gguf'}"
    definition["model_specs"] = [spec]
    # The registry's host lacks the folder (hidden in its mount namespace): it asks the workers' hosts.
    c.register_model("LLM", definition)
    nowhere = llm_definition(tiny_models, "nowhere")
    nowhere["model_specs"] = [{**spec, "model_uri": "file:///models/nowhere"}]
    with pytest.raises(InvalidRequest) as err:
        c.register_model("LLM", nowhere)
    assert "/models/nowhere does not exist on the registry's host nor on any worker's host (host-" in str(err.value)
    assert "host-a" in str(err.value) and "host-b" in str(err.value)
    uid = c.launch_model(model_name="only-on-b", model_uid="on-b")  # host-a lacks the files: it goes to host-b
    assert c.describe_model(uid)["devices"] == ["host-b/cpu"]
    with pytest.raises(NotFound) as err:
        c.launch_model(model_name="only-on-b", worker_ip="host-a", model_uid="on-a")
    assert f"{hosts.only_b / 'gguf'}" in str(err.value) and "on host host-a" in str(err.value)
    assert err.value.field == "model_uri"
    # The same from the command line, pinned with --host: one line naming the host and the path, exit code 1.
    cli = subprocess.run([sys.executable, "-m", "zinfer", "launch", "--model-name", "only-on-b", "--host", "host-a",
                          "-u", "on-a", "-e", hosts.endpoint], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**hosts.env, "ZINFER_HOME": str(hosts.core_home), "COLUMNS": "400"})
    assert cli.returncode != 0 and "on host host-a" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr
    assert str(hosts.only_b / "gguf") in cli.stderr
    c.terminate_model(uid)


def test_a_host_cut_off_is_lost_alone_and_is_reconciled_when_it_returns(hosts):
    c = hosts.c
    liveness = HEARTBEAT * LIVENESS
    # Requests in flight on host-a when its cable is pulled: an embedding of 2,048 texts (seconds of work, so
    # certainly unfinished) and a token-by-token stream (it may finish first on a fast machine).
    pending: dict = {}

    def big_embed():
        try:
            hosts.client().get_model("emb-host-a").create_embedding(
                ["the blue whale is the largest animal that has ever lived on the earth"] * 2048, timeout=60)
            pending["embed"] = "answered"
        except ZinferError as exc:
            pending["embed"] = exc
        pending["embed_at"] = time.monotonic()

    started = c.describe_model("emb-host-a")["stats"].get("requests", 0)
    embedder = threading.Thread(target=big_embed)
    embedder.start()
    wait_for(lambda: c.describe_model("emb-host-a")["stats"].get("requests", 0) > started, timeout=30)
    stream = c.get_model("gen-host-a").generate(PROMPT, {"max_tokens": 2000, "ignore_eos": True, "stream": True,
                                                        "stream_interval_ms": 0})
    next(stream)
    cut = time.monotonic()
    hosts.net.link("host-a", up=False)
    try:
        for _ in stream:
            pass
    except Unavailable:
        pass  # failed, typed (or it had finished before the cut)
    embedder.join(timeout=60)
    assert isinstance(pending["embed"], Unavailable), pending  # the pending request fails, typed
    pending_failed = pending["embed_at"] - cut

    def a_lost():  # nothing the scheduler can vouch for: `restarting` (back when the host returns), never `ready`
        view = c.describe_model("gen-host-a")
        return view if view["state"] == "restarting" else None

    view = wait_for(a_lost, timeout=4 * liveness)
    detected = time.monotonic() - cut
    assert "host-a/cpu" in view["restart_cause"] and "stopped reporting" in view["restart_cause"], view
    assert detected < 3 * liveness and pending_failed < 3 * liveness, (detected, pending_failed)
    # host-b serves on: its own models, and the replica of `both` that is there.
    assert c.get_model("gen-host-b").generate(PROMPT, FOUR_GREEDY)["usage"]["completion_tokens"] == 4
    for _ in range(3):
        assert c.get_model("both").generate(PROMPT, FOUR_GREEDY)["usage"]["completion_tokens"] == 4
    assert c.get_model("emb-host-b").create_embedding("still here")["data"]
    with pytest.raises(ZinferError):
        c.get_model("emb-host-a").create_embedding("cut off", timeout=2 * liveness)
    # The cable back: the worker re-joins, its instances (never unloaded) are reconciled to ready.
    hosts.net.link("host-a", up=True)
    back = time.monotonic()
    wait_for(lambda: c.describe_model("gen-host-a")["state"] == "ready", timeout=60)
    print(f"link down: pending request failed after {pending_failed:.2f} s, instance failed after {detected:.2f} s; "
          f"link up: ready after {time.monotonic() - back:.2f} s")  # figures for docs/scale.md (pytest -s)
    wait_for(lambda: c.describe_model("both")["state"] == "ready", timeout=60)
    out = c.get_model("gen-host-a").generate(PROMPT, FOUR_GREEDY)
    assert out["usage"]["completion_tokens"] == 4
    # Each instance process re-joins the broker by itself (its own reconnect back-off): poll until it answers.
    wait_for(lambda: c.get_model("emb-host-a").create_embedding("back", timeout=5)["data"], timeout=60)


STRANGER = """
import sys, zmq, zmq.utils.monitor
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
public, secret = zmq.curve_keypair()
sock.curve_publickey, sock.curve_secretkey = public, secret
sock.curve_serverkey = sys.argv[2].encode()
monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
sock.connect(sys.argv[1])
sock.send_multipart([b"", b"hello"])
if monitor.poll(20000):
    event = zmq.utils.monitor.recv_monitor_message(monitor)
    print("refused" if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "accepted")
else:
    print("no answer")
"""


def test_a_peer_without_a_key_of_the_mesh_is_refused(hosts):
    """From a third namespace, a CURVE key the roster does not hold (with the broker's public key, which is no
    secret): the broker's authenticator refuses the handshake."""
    broker_key = keys.broker_public_key(hosts.core_home).decode()
    proc = hosts.net.exec_in("stranger", sys.executable, "-c", STRANGER, hosts.endpoint, broker_key)
    assert proc.stdout.strip() == "refused", proc.stdout + proc.stderr
    assert len(hosts.c.scheduler_status()["workers"]) == 2


def test_revoking_a_hosts_key_cuts_its_workers_off(hosts):
    """`zinfer keys revoke host-b` on the head: the broker drops host-b's worker and refuses its handshakes from
    then on (it keeps retrying); its instances are lost (`restarting`, until it returns or they move after
    worker_return_s); host-a serves on. (Last of the namespace tests.)"""
    c = hosts.c
    out = subprocess.run([sys.executable, "-m", "zinfer", "keys", "revoke", "host-b", "--home", str(hosts.core_home)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: {w["worker_id"] for w in c.scheduler_status()["workers"]} == {"host-a/cpu"}, timeout=30)
    wait_for(lambda: c.describe_model("gen-host-b")["state"] == "restarting", timeout=30)
    assert c.get_model("gen-host-a").generate(PROMPT, FOUR_GREEDY)["usage"]["completion_tokens"] == 4
    assert c.get_model("both").generate(PROMPT, FOUR_GREEDY)["usage"]["completion_tokens"] == 4


# ---------------------------------------------------------------- without namespaces


def test_a_standalone_worker_outlives_the_shell_that_started_it(mesh, tiny_models, tmp_path):
    """`setsid nohup zinfer worker ... &` from a shell that then exits: the worker keeps running (only children of
    `zinfer up` die with their parent)."""
    env = {k: v for k, v in mesh.env.items() if k != "ZINFER_DIE_WITH_PARENT"}
    log = tmp_path / "worker.log"
    shell = subprocess.run(["bash", "-c", f"setsid nohup {sys.executable} -m cli worker --device cpu:7 "
                            f"> {log} 2>&1 & echo $!"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=30)
    pid = int(shell.stdout.strip())  # the shell has exited here
    try:
        wait_for(lambda: "cpu:7" in {w["worker_id"] for w in mesh.client.scheduler_status()["workers"]})
        # Still there, and working, well after its shell is gone: a model launched on it answers.
        mesh.client.register_model("embedding", embedding_definition(tiny_models))
        uid = mesh.client.launch_model(model_name="custom-bge-base-en", model_type="embedding", devices=["cpu:7"],
                                       model_uid="on-orphan")
        assert len(mesh.client.get_model(uid).create_embedding("still here")["data"]) == 1
        assert os.path.exists(f"/proc/{pid}") and "stopped" not in log.read_text()
        assert "cpu:7" in {w["worker_id"] for w in mesh.client.scheduler_status()["workers"]}
    finally:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or "Z" in _proc_state(pid), timeout=30)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_worker_is_named_by_its_host_when_the_broker_is_elsewhere():
    from zinfer.services.worker.host.device import default_worker_id, is_local, local_address

    own = local_address("tcp://192.0.2.200:9997") or "127.0.0.1"  # this host's address towards that network
    for endpoint in ("ipc:///tmp/x.sock", "tcp://127.0.0.1:9997", "tcp://0.0.0.0:9997", "tcp://localhost:1",
                     f"tcp://{own}:9997"):
        assert is_local(endpoint) and default_worker_id("cuda:0", endpoint) == "cuda:0", endpoint
    if own != "127.0.0.1":  # a host with a route off itself: a broker elsewhere names the worker HOST/DEVICE
        assert not is_local("tcp://192.0.2.200:9997")
        assert default_worker_id("cuda:0", "tcp://192.0.2.200:9997") == f"{socket.gethostname()}/cuda:0"

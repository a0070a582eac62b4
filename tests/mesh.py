"""Run a real mesh for tests: broker, registry, scheduler and workers as separate processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import zmq

from zinfer.shared import keys
from zinfer.shared.client import Client
from zinfer.shared.errors import ZinferError

REPO = Path(__file__).resolve().parents[1]
# Liveness in tests: 0.5 s heartbeats, 6 missed = 3 s. Tight enough to see a stalled peer quickly, loose enough
# for a busy 2-core machine (0.25 s x 3 failed peers whose I/O thread was starved during model loads). A process
# that dies is noticed sooner: its connection closes, and the next heartbeat to it fails at once.
HEARTBEAT = 0.5
LIVENESS = 6


_SESSION: dict = {}  # this test session's folder, and its preloader's process and socket


def session_folder() -> Path:
    """A folder for the whole test session (its preloader's socket and log, transformers' remote-code modules),
    removed when the session ends."""
    if "folder" not in _SESSION:
        import atexit
        import shutil
        import tempfile

        _SESSION["folder"] = Path(tempfile.mkdtemp(prefix="zinfer-tests-"))
        atexit.register(shutil.rmtree, _SESSION["folder"], ignore_errors=True)
    return _SESSION["folder"]


def mesh_env(endpoint: str, home: Path, heartbeat: float = HEARTBEAT, liveness: int = LIVENESS) -> dict[str, str]:
    """The environment of a test mesh's processes (and of a `zinfer up` a test runs): the session's preloader
    serves workers started with it."""
    env = dict(os.environ, ZINFER_ENDPOINT=endpoint, ZINFER_HOME=str(home),
               ZINFER_HEARTBEAT_INTERVAL=str(heartbeat), ZINFER_HEARTBEAT_LIVENESS=str(liveness),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", ZINFER_LOG_LEVEL="INFO",
               HF_MODULES_CACHE=str(session_folder() / "hf-modules"),  # never the user's
               ZINFER_DIE_WITH_PARENT="1")  # nothing outlives the test process
    env.pop("PYTEST_CURRENT_TEST", None)  # pytest's, per test: not the mesh's
    return env


def session_preloader(env: dict[str, str]) -> str:
    """The socket of the test session's preloader, started with the first worker that needs it. The session's
    meshes all run on this one host, so their workers' fork servers come from one preloader, as `zinfer up`'s do.
    Its environment is the mesh's but for the ZINFER_* variables; a worker whose environment differs elsewhere is
    refused and starts its own fork server."""
    if "preloader" not in _SESSION or _SESSION["preloader"].poll() is not None:
        import atexit

        folder = session_folder()
        path = folder / "preloader.sock"
        preloader_env = {k: v for k, v in env.items() if not k.startswith("ZINFER_")}
        preloader_env.update(ZINFER_HOME=str(folder / "home"), ZINFER_DIE_WITH_PARENT="1")
        with open(folder / "preloader.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "zinfer", "preloader", "--socket", str(path)],
                                    env=preloader_env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        atexit.register(lambda: (proc.terminate(), proc.wait(15)))  # before the folder goes (atexit runs LIFO)
        deadline = time.monotonic() + 60
        while not path.exists():  # it listens before it imports
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the session's preloader did not start: {(folder / 'preloader.log').read_text()}")
            time.sleep(0.02)
        _SESSION.update(preloader=proc, socket=path)
    return str(_SESSION["socket"])


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts as gone); it may vanish while we look."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mesh:
    def __init__(self, home: Path, log_dir: Path, heartbeat: float = HEARTBEAT, cpu_budget_mb: int = 0,
                 liveness: int = LIVENESS, preloader: bool = True):
        self.preloader = preloader  # workers' fork servers from the session's preloader (False: their own)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.liveness = heartbeat * liveness  # seconds of silence after which a peer is declared dead
        self.home = home
        self.log_dir = log_dir
        self.env = mesh_env(self.endpoint, home, heartbeat, liveness)
        if cpu_budget_mb:
            self.env["ZINFER_CPU_MEMORY_BUDGET_MB"] = str(cpu_budget_mb)
        self.procs: dict[str, subprocess.Popen] = {}
        keys.init_keys(home)  # what `zinfer up` does: broker, service, admin and user keys
        self.admin_key = keys.client_key_path(home, "admin")
        self.user_key = keys.client_key_path(home, "user")
        self.client = self.new_client()

    def new_client(self, timeout: float = 60.0, key=None) -> Client:
        """A client of this mesh, with its admin key unless `key` (a key file) says otherwise. Its timeout is
        generous: a busy machine (the suite beside CPU burners) must slow a test down, never fail it."""
        return Client(self.endpoint, timeout=timeout, key=key or self.admin_key)

    @property
    def service_key(self) -> Path:
        return keys.keys_dir(self.home) / "service.key_secret"

    def raw_socket(self, key_file: Path | None) -> zmq.Socket:
        """A DEALER to the broker for tests that send hand-made frames: CURVE with `key_file`, or plaintext."""
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if key_file is not None:
            keys.read_key_file(key_file).apply(sock, keys.broker_public_key(self.home))
        sock.connect(self.endpoint)
        return sock

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name.replace('/', '_').replace(':', '_')}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "zinfer", *args], env=self.env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def start_broker(self) -> None:
        self.start("broker", "broker")
        self.wait(lambda: self.client.broker_status(timeout=0.5))

    def start_all(self, workers: tuple[str, ...] = ("cpu",), budgets: dict[str, int] | None = None) -> Mesh:
        # Workers first: each one's fork server imports the engines (~5 s on 2 cores), which a test's first launch
        # waits for; the services join the broker whenever it answers.
        for device in workers:
            self.start_worker(device, (budgets or {}).get(device))
        self.start_broker()
        self.start("registry", "registry")
        self.start("scheduler", "scheduler")
        self.wait_services({"registry", "scheduler", *(f"worker/{d}" for d in workers)})
        self.wait(lambda: len(self.client.scheduler_status()["workers"]) == len(workers) or None)
        return self

    def start_worker(self, device: str, budget_mb: int | None = None) -> None:
        self.env.setdefault("ZINFER_PRELOADER", session_preloader(self.env) if self.preloader else "none")
        args = ["worker", "--device", device]
        if budget_mb:
            args += ["--memory-budget-mb", str(budget_mb)]
        self.start(f"worker/{device}", *args)

    def start_gateway(self) -> None:
        """The HTTP gateway on a free port; `gateway_url` is its base URL once /health answers."""
        import urllib.request

        port = free_port()
        self.env["ZINFER_GATEWAY_PORT"] = str(port)
        self.start("gateway", "gateway")
        self.gateway_url = f"http://127.0.0.1:{port}"

        def healthy():
            try:
                with urllib.request.urlopen(f"{self.gateway_url}/health", timeout=1) as response:
                    return response.status == 200
            except OSError:
                return None

        self.wait(healthy)

    def services(self) -> set[str]:
        return {p["service"] for p in self.client.broker_status(timeout=1)["peers"]}

    def wait_services(self, names: set[str], timeout: float = 60) -> None:
        self.wait(lambda: names <= self.services() or None, timeout)

    def wait(self, probe, timeout: float = 60, interval: float = 0.05):
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None and name in self._expected:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_dir}")
            try:
                result = probe()
                if result is not None and result is not False:
                    return result
            except ZinferError as exc:
                last = exc
            time.sleep(interval)
        raise TimeoutError(f"mesh condition not met in {timeout}s (last error: {last})")

    @property
    def _expected(self) -> set[str]:
        return {n for n, p in self.procs.items() if getattr(p, "expected_alive", True)}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.expected_alive = False
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def kill_during_a_call(self, victim: str, sleep: int) -> tuple[str, float]:
        """A call to testpeer that sleeps `sleep` seconds, and `victim` SIGKILLed while the broker holds it: the
        Unavailable error the caller got, and how soon after the kill it came."""
        import threading

        from zinfer.shared import protocol as p
        from zinfer.shared.errors import Unavailable

        client, result = self.new_client(timeout=30), {}

        def call():
            try:
                client.call("testpeer", p.Ping(payload=f"sleep:{sleep}".encode()))
            except Unavailable as exc:
                result["error"], result["at"] = str(exc), time.monotonic()

        caller = threading.Thread(target=call)
        caller.start()
        self.wait(lambda: self.client.broker_status()["pending"] >= 1 or None)  # the request is at the peer
        killed = time.monotonic()
        self.kill(victim)
        caller.join(timeout=10)
        return result["error"], result["at"] - killed

    def stop(self) -> None:
        self.client.close()
        for proc in self.procs.values():
            proc.expected_alive = False
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

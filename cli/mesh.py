"""Process commands: up (the whole mesh), broker, registry, scheduler, worker; and status."""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
import zmq

from zinfer.cli import runfile
from zinfer.cli.common import Endpoint, Timeout, command, console, fail, make_client, print_table
from zinfer.services.worker.host.preloader import resolve as resolve_preloader
from zinfer.services.worker.host.preloader import socket_path
from zinfer.shared import keys
from zinfer.shared.config import Settings, load_settings
from zinfer.shared.endpoints import endpoint_holder
from zinfer.shared.errors import ZinferError
from zinfer.shared.logs import configure_logging, log_folder, log_name
from zinfer.shared.transport import die_with_parent

Home = Annotated[str | None, typer.Option("--home", help="Data folder (default ~/.zinfer or ZINFER_HOME).")]


def _settings(endpoint: str | None, home: str | None = None) -> Settings:
    return load_settings(endpoint=endpoint, home=home)


def _logging(service: str, settings: Settings):
    """stderr, and <home>/logs/<service>.log (what `zinfer logs` reads)."""
    return configure_logging(service, settings.home_path, max_mb=settings.log_max_mb, backups=settings.log_backups)


def quiet_progress_bars() -> None:
    """Download and loading bars (huggingface_hub, transformers' tqdm) belong on a user's terminal, not in a
    service's log; launch progress reaches users through the scheduler instead."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")


def broker(endpoint: Endpoint = None, home: Home = None) -> None:
    """Run the broker (one ROUTER socket every process connects to, CURVE with the keys under <home>/keys)."""
    from zinfer.services.broker.broker import Broker

    settings = _settings(endpoint, home)
    log = _logging("broker", settings)
    die_with_parent()
    b = Broker(settings)
    try:
        b.bind()
    except zmq.ZMQError as exc:
        b.close()
        fail(f"cannot listen on {settings.endpoint}: {exc.strerror}")
    b.install_signal_handlers()
    log.info("broker_listening", endpoint=b.endpoint)
    b.serve()


def registry(endpoint: Endpoint = None, home: Home = None) -> None:
    """Run the registry service (model definitions)."""
    from zinfer.services.registry.service import run_registry

    settings = _settings(endpoint, home)
    _logging("registry", settings)
    die_with_parent()
    raise typer.Exit(run_registry(settings))


def scheduler(endpoint: Endpoint = None, home: Home = None) -> None:
    """Run the scheduler service (workers, placement, instances)."""
    from zinfer.services.scheduler.service import run_scheduler

    settings = _settings(endpoint, home)
    _logging("scheduler", settings)
    die_with_parent()
    raise typer.Exit(run_scheduler(settings))


def worker(
    device: Annotated[str, typer.Option("--device", "-d", help="cpu, cpu:N or cuda:N.")] = "cpu",
    memory_budget_mb: Annotated[int | None, typer.Option(
        "--memory-budget-mb", help="Memory this worker may fill (CPU; default from config/system).")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="Its name in the mesh (default: the device beside a local broker, HOST/DEVICE when the "
        "broker is on another host).")] = None,
    endpoint: Endpoint = None,
    home: Home = None,
) -> None:
    """Run an inference worker for one device. On another host: `zinfer keys import BUNDLE`, then
    `zinfer worker -e tcp://BROKER:9997 --device cuda:0` (it keeps running when its shell exits)."""
    from zinfer.services.worker.host.device import default_worker_id, parse_device

    settings = load_settings(endpoint=endpoint, home=home, cpu_memory_budget_mb=memory_budget_mb)
    try:
        kind, index = parse_device(device)
    except ValueError as exc:
        fail(f"--device: {exc}")
    if kind == "cuda":  # before torch is imported anywhere in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    from zinfer.services.worker.host.supervisor import start_fork_server

    start_fork_server(settings)  # asked for now: its engine imports (seconds) run while this joins the mesh
    worker_id = name or default_worker_id(device, settings.endpoint)
    if not worker_id or any(c in worker_id for c in " \t\n#") or len(worker_id) > 128:
        fail(f"--name {worker_id!r}: 1 to 128 characters, no spaces or '#'")
    quiet_progress_bars()
    _logging(f"worker/{worker_id}", settings)
    # A native crash in an engine (llama.cpp, torch) prints every thread's Python stack to stderr before the
    # process dies (under `zinfer up`: <home>/logs/<service>.out), instead of only a broker's "disconnected".
    faulthandler.enable()
    die_with_parent()
    from zinfer.services.worker.host.service import run_worker

    raise typer.Exit(run_worker(settings, device, worker_id))


def preloader(
    socket: Annotated[str | None, typer.Option(
        "--socket", help="Where to listen (default <home>/run/preloader.sock).")] = None,
    home: Home = None,
) -> None:
    """Run this host's preloader: it imports the engines once and forks each worker's fork server from them, so a
    worker's first launch never waits for those imports. `zinfer up` starts one; a worker finds it through the
    `preloader` setting (ZINFER_PRELOADER)."""
    from zinfer.services.worker.host.preloader import serve

    settings = _settings(None, home)
    log = _logging("preloader", settings)
    die_with_parent()
    raise typer.Exit(serve(Path(socket) if socket else socket_path(settings.home_path), log))


def gateway(
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port to listen on (default 9998).")] = None,
    endpoint: Endpoint = None,
    home: Home = None,
) -> None:
    """Run the HTTP gateway: OpenAI's and Xinference's REST APIs over the mesh (docs at /docs)."""
    settings = load_settings(endpoint=endpoint, home=home, gateway_host=host, gateway_port=port)
    listen = f"tcp://{settings.gateway_host}:{settings.gateway_port}"
    holder = endpoint_holder(listen)
    if holder is not None:
        fail(f"cannot listen on {settings.gateway_host}:{settings.gateway_port}: in use by {holder}")
    log = _logging("gateway", settings)
    die_with_parent()
    import uvicorn

    from zinfer.services.gateway.app import create_app

    app = create_app(settings)  # before the server starts: a missing key is one line here, not a traceback
    loop = "uvloop" if _has("uvloop") else "asyncio"
    http = "httptools" if _has("httptools") else "h11"
    log.info("gateway_listening", url=f"http://{settings.gateway_host}:{settings.gateway_port}", loop=loop, http=http)
    uvicorn.Server(uvicorn.Config(app, host=settings.gateway_host, port=settings.gateway_port, log_config=None,
                                  access_log=False, loop=loop, http=http, proxy_headers=False,
                                  timeout_graceful_shutdown=5)).run()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def detect_gpus() -> int:
    """Count GPUs without importing torch (which takes seconds)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _out_file(home, args: list[str]) -> Path:
    """Where a child of `up` writes what does not go through logging (a crash, a native library's prints)."""
    name = args[0] if args[0] != "worker" else f"worker/{args[2]}"
    return log_folder(home) / f"{log_name(name)}.out"


def _spawn(args: list[str], env: dict, home) -> subprocess.Popen:
    out = _out_file(home, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "ab") as sink:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "zinfer", *args], env=env, stdin=subprocess.DEVNULL,
                                stdout=sink, stderr=subprocess.STDOUT)


def _tail(path: Path, lines: int = 8) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


class ProcessGroup:
    """The processes of `zinfer up`: started in order and written to the run file (`zinfer down` reads it),
    restarted when one dies (at most once every 2 s each), stopped together (SIGTERM in reverse order, SIGKILL
    after 10 s)."""

    def __init__(self, env: dict, home: Path, me: runfile.UpRecord):
        self.env, self.home, self.me = env, home, me
        self.children: list[tuple[list[str], subprocess.Popen]] = []
        self.restarted: dict[int, float] = {}
        self.stopping = False

    def stop_soon(self, *_signal) -> None:
        self.stopping = True

    def start(self, args: list[str]) -> subprocess.Popen:
        proc = _spawn(args, self.env, self.home)
        self.children.append((args, proc))
        self._record()
        return proc

    def _record(self) -> None:
        self.me.children = [runfile.Child(args=a, pid=c.pid, started=runfile.started_at(c.pid))
                            for a, c in self.children]
        runfile.write(self.home, self.me)

    def check_started(self) -> None:
        """Fail `zinfer up` (with the process's last output) if one exited while the mesh was starting."""
        for args, proc in self.children:
            if proc.poll() is not None:
                fail(f"`zinfer {' '.join(args)}` exited with code {proc.returncode} while starting:\n"
                     f"{_tail(_out_file(self.home, args))}")

    def keep_whole(self) -> None:
        """Start again a process that exited (the mesh stays whole), showing why it ended."""
        for i, (args, proc) in enumerate(self.children):
            if proc.poll() is None or self.stopping or time.monotonic() - self.restarted.get(i, 0) <= 2:
                continue
            console.print(f"[yellow]`zinfer {' '.join(args)}` exited ({proc.returncode}); restarting[/]",
                          highlight=False)
            tail = _tail(_out_file(self.home, args))
            if tail:
                console.print(tail, highlight=False, markup=False)
            self.restarted[i] = time.monotonic()
            self.children[i] = (args, _spawn(args, self.env, self.home))
            self._record()

    def stop(self) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in self.children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        runfile.remove(self.home, os.getpid())


def _preflight(settings: Settings, http: bool) -> None:
    """Refuse to start beside a running mesh, on a taken endpoint or gateway port: before anything starts, a
    second mesh must never join or disturb the first."""
    home_path = settings.home_path
    running = runfile.read(home_path)
    if running is not None and runfile.alive(running.pid, running.started):
        fail(f"a mesh is already running from {home_path} (zinfer up, pid {running.pid}, at {running.endpoint}); "
             "stop it with `zinfer down`, or use another --home")
    holder = endpoint_holder(settings.endpoint)
    if holder is not None:
        fail(f"{settings.endpoint} is in use by {holder}; stop that mesh first (`zinfer down`, or Ctrl-C to its "
             "`zinfer up`) or choose another endpoint with -e")
    holder = endpoint_holder(f"tcp://{settings.gateway_host}:{settings.gateway_port}") if http else None
    if holder is not None:
        fail(f"the gateway's {settings.gateway_host}:{settings.gateway_port} is in use by {holder}; choose "
             "another with ZINFER_GATEWAY_PORT, or start without it (--no-http)")


def _wait_for_broker(client, broker: subprocess.Popen, settings: Settings, args: list[str]) -> None:
    """Until the broker answers (it is bound); it exits at once if the port is taken."""
    deadline = time.monotonic() + 30
    while True:
        if broker.poll() is not None:
            home = settings.home_path
            fail(f"the broker could not start on {settings.endpoint}:\n"
                 f"{_tail(_out_file(home, args)) or _tail(log_folder(home) / 'broker.log')}")
        try:
            answered = client.broker_status(timeout=0.5)["pid"]
        except ZinferError:
            if time.monotonic() > deadline:
                fail(f"the broker did not come up on {settings.endpoint}")
            time.sleep(0.1)
            continue
        if answered != broker.pid:  # someone else's broker took the endpoint meanwhile
            fail(f"{settings.endpoint} is answered by another broker (pid {answered}); not starting")
        return


def _start_preloader(group: ProcessGroup, path: Path) -> None:
    """The preloader, listening (it binds its socket before its imports) before any worker asks it."""
    path.unlink(missing_ok=True)  # a dead one's: a worker must not find it and be refused
    group.start(["preloader"])
    deadline = time.monotonic() + 30
    while not path.exists():
        group.check_started()
        if time.monotonic() > deadline:
            fail(f"the preloader did not listen on {path} in 30s")
        time.sleep(0.05)


def _preloader_for_up(settings: Settings, any_workers: bool) -> tuple[Path | None, bool]:
    """The preloader `up`'s workers ask (None: none), and whether `up` starts it: with the `preloader` setting
    `auto` (the default) its own at <home>/run/preloader.sock; `none`, none; a socket path, the preloader that
    listens there (a host's, started with `zinfer preloader --socket`), which `up` neither starts nor stops."""
    if not any_workers:
        return None, False
    if settings.preloader == "auto":
        return socket_path(settings.home_path), True
    path, _ = resolve_preloader(settings.preloader, settings.home_path)  # as a worker reads it: none, or a path
    if path is not None and not path.exists():
        console.print(f"[yellow]the preloader setting names {path}, where none listens[/]: each worker imports the "
                      "engines for its own fork server", highlight=False)
    return path, False


def up(
    endpoint: Endpoint = None,
    home: Home = None,
    gpus: Annotated[int | None, typer.Option("--gpus", help="GPU workers to start (default: all found).")] = None,
    cpu: Annotated[bool, typer.Option("--cpu/--no-cpu", help="Start a CPU worker.")] = True,
    http: Annotated[bool, typer.Option("--http/--no-http", help="Start the HTTP gateway.")] = True,
    restore: Annotated[bool, typer.Option(
        "--restore/--no-restore", help="Load the instances launched before (after `zinfer down`, a reboot or a "
        "crash) again; --no-restore brings them back idle-unloaded, to load on their first request.")] = True,
) -> None:
    """Start broker, registry, scheduler, one worker per device and the HTTP gateway; Ctrl-C or `zinfer down`
    stops them all, and the next `zinfer up` loads what was launched again. Services log to <home>/logs
    (`zinfer logs`)."""
    settings = _settings(endpoint, home)
    home_path = settings.home_path
    _preflight(settings, http)
    created = keys.init_keys(settings.home_path).created
    if created:
        console.print(f"created keys in {keys.keys_dir(settings.home_path)}: {', '.join(created)}")
    n_gpu = detect_gpus() if gpus is None else gpus
    devices = [*(f"cuda:{i}" for i in range(n_gpu)), *(["cpu"] if cpu else [])]
    workers = [["worker", "--device", device] for device in devices]
    preloader_socket, own_preloader = _preloader_for_up(settings, bool(workers))
    # Children log to their files only (ZINFER_LOG_STDERR=0); their stderr, for crashes, goes to <service>.out.
    env = dict(os.environ, ZINFER_ENDPOINT=settings.endpoint, ZINFER_HOME=str(home_path), ZINFER_LOG_STDERR="0",
               **({} if restore else {"ZINFER_RESTORE": "false"}),
               ZINFER_PRELOADER=str(preloader_socket or "none"), ZINFER_DIE_WITH_PARENT="1")
    plan = [*workers, ["registry"], ["scheduler"], *([["gateway"]] if http else [])]
    gateway_url = f"http://{settings.gateway_host}:{settings.gateway_port}"
    group = ProcessGroup(env, home_path, runfile.UpRecord(
        pid=os.getpid(), started=runfile.started_at(os.getpid()), endpoint=settings.endpoint,
        gateway=gateway_url if http else ""))
    signal.signal(signal.SIGTERM, group.stop_soon)
    signal.signal(signal.SIGINT, group.stop_soon)
    try:
        client = make_client(settings.endpoint, timeout=2.0)
        _wait_for_broker(client, group.start(["broker"]), settings, ["broker"])
        if own_preloader:  # the preloader, then the workers: it makes the engine imports once for their fork servers
            _start_preloader(group, preloader_socket)
        started = time.monotonic()
        for args in plan:
            group.start(args)
        want = {"registry", "scheduler"} | {f"worker/{a[2]}" for a in plan if a[0] == "worker"}
        while not group.stopping:
            services = {peer["service"] for peer in client.broker_status(timeout=2)["peers"]}
            if want <= services and (not http or _answers(f"{gateway_url}/health")):
                break
            group.check_started()
            if time.monotonic() > started + 90:
                fail(f"still waiting for {sorted(want - services)} after 90s")
            time.sleep(0.1)
        web = f"; HTTP (OpenAI, Xinference) at {gateway_url}/v1" if http else ""
        console.print(f"[bold green]zinfer is up[/] at {settings.endpoint}{web} (home {home_path}); "
                      f"{len(group.children)} processes: {', '.join(' '.join(a) for a, _ in group.children)}. "
                      "Logs: `zinfer logs -f`. Stop: Ctrl-C or `zinfer down`.", highlight=False)
        while not group.stopping:
            time.sleep(0.2)
            group.keep_whole()
    finally:
        group.stop()
        if group.stopping:
            console.print("zinfer stopped")


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def status(endpoint: Endpoint = None, timeout: Timeout = 5.0) -> None:
    """Live services, workers and their devices."""
    with make_client(endpoint, timeout) as client:
        broker_status = client.broker_status()
        rows = [[peer["service"], ", ".join(peer["uids"]), peer["inflight"], f"{peer['idle_s']:.1f}s"]
                for peer in sorted(broker_status["peers"], key=lambda x: x["service"])]
        print_table(["Service", "Model uids", "In flight", "Last heard"], rows,
                    title=f"broker {broker_status['endpoint']}")
        services = {peer["service"] for peer in broker_status["peers"]}
        if "scheduler" in services:
            workers = client.scheduler_status()["workers"]
            print_table(["Worker", "Device", "Host", "Address", "Free", "Total", "PID"],
                        [[w["worker_id"], w["device"] + (f" ({w['gpu_name']})" if w["gpu_name"] else ""),
                          w["host"], w["address"], _fmt_bytes(w["free_memory"]), _fmt_bytes(w["total_memory"]),
                          w["pid"]]
                         for w in workers], title="workers")
        if "registry" in services:
            reg = client.registry_status()
            console.print(f"registry: built-in {reg['builtin']}, custom {reg['custom']}")
            for bad in reg["corrupt"]:
                console.print(f"[red]corrupt definition[/] {bad['path']}: {bad['error']}", highlight=False)


# The commands that run one process of the mesh each (cli/main.py gives such a line an app of these only).
SERVICE_COMMANDS = (broker, registry, scheduler, worker, preloader, gateway)
SERVICES = tuple(fn.__name__ for fn in SERVICE_COMMANDS)


def install_services(app: typer.Typer) -> None:
    for fn in SERVICE_COMMANDS:
        command(app, fn)


def install(app: typer.Typer) -> None:
    command(app, up)
    install_services(app)
    command(app, status)

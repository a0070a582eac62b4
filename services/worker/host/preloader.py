"""The host's preloader: one process per host that imports the engines once and forks each worker's fork server.

Without it, every worker starts its own fork server (supervisor.py), which imports torch, transformers,
sentence-transformers and llama.cpp before it can fork an instance: 6.5-7.5 s of CPU on a 2-core machine. `zinfer
up` on a host with 8 GPUs starts 9 of them at once, and a worker that restarts makes its next launches wait for
them again. The preloader imports the same modules (preload.py) once, then answers each worker that asks with a
fork of itself that becomes that worker's fork server: multiprocessing's own `forkserver.main`, on a listener
socket and "alive" pipe the worker made, in the worker's environment, working directory, stdout and stderr. It
is ready in milliseconds, and its pages are shared with every other worker's.

The worker asks as it starts (`PendingForkServer`, made by supervisor.start_fork_server) and reads the answer
before its first instance process (supervisor.fork_server_ready), so a preloader still importing delays only that
launch, as the worker's own fork server would. It falls back to its own fork server when there is no preloader,
or the preloader refuses: another Python, another sys.path, or an environment that differs in anything an import
may have read (every variable but ZINFER_* and CUDA_VISIBLE_DEVICES, which zinfer and CUDA read at run time,
after the fork). What the preloader's imports set in its environment is set in each fork server's too.

The preloader runs no thread and no engine code; it forks only fork servers, and each one outlives it (a
preloader that dies leaves the workers it served as they were). Its socket is a file of mode 0600 under
<home>/run: only its own user can ask, as with multiprocessing's fork server socket.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import select
import signal
import socket
import sys
import threading
from multiprocessing import connection, forkserver, resource_tracker
from pathlib import Path

import msgspec
import structlog

# What a fork server imports before it forks anything (the worker's own, or the preloader once for all).
PRELOAD = ["zinfer.services.worker.host.preload"]
# Read at run time (after the fork), so they may differ between the preloader and a worker it serves.
RUNTIME_PREFIXES = ("ZINFER_",)
RUNTIME_VARIABLES = {"CUDA_VISIBLE_DEVICES", "_"}  # "_": the shell's last command, which nothing reads
ANSWER_TIMEOUT_S = 300.0  # a preloader still importing on a machine busy with model loads


class ForkServerRequest(msgspec.Struct, forbid_unknown_fields=True):
    env: dict[str, str]
    cwd: str
    executable: str
    version: str
    sys_path: list[str]


class ForkServerAnswer(msgspec.Struct, forbid_unknown_fields=True):
    pid: int = 0
    refused: str = ""  # why not: the worker starts its own fork server


_request_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ForkServerRequest))
_answer_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ForkServerAnswer))


def socket_path(home: Path) -> Path:
    return home / "run" / "preloader.sock"


def resolve(setting: str, home: Path) -> tuple[Path | None, str]:
    """The socket a worker asks, from the `preloader` setting: "auto" (the default) is <home>/run/preloader.sock
    when a preloader made it, "none" is none, anything else is a path. With None, why not."""
    if setting == "none":
        return None, "the preloader setting is none"
    if setting == "auto":
        path = socket_path(home)
        return (path, "") if path.exists() else (None, f"no preloader listens at {path}")
    return Path(setting).expanduser(), ""


def import_environment(env: dict[str, str]) -> dict[str, str]:
    """The variables an import may have read: all but those zinfer and CUDA read at run time."""
    return {k: v for k, v in env.items() if not k.startswith(RUNTIME_PREFIXES) and k not in RUNTIME_VARIABLES}


def refusal(request: ForkServerRequest, own_env: dict[str, str], set_by_imports: dict[str, str]) -> str:
    """Why the preloader's imports would not be the ones the worker's own fork server makes; '' if they would.
    `own_env`: the preloader's as it started; a variable its imports set may come set to the same value (a worker
    started by a process that made the same imports)."""
    if request.executable != sys.executable or request.version != sys.version:
        return f"another Python ({request.executable}, not {sys.executable})"
    if request.sys_path != sys.path:
        return "another sys.path"
    theirs = import_environment(request.env)
    differ = sorted(k for k in own_env.keys() | theirs.keys()
                    if own_env.get(k) != theirs.get(k) and not (k in set_by_imports and theirs[k] == set_by_imports[k]))
    if differ:
        return f"an environment that differs in {', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}"
    return ""


# ---------------------------------------------------------------- the preloader process


def serve(path: Path, log) -> int:
    """Listen on `path` at once (a worker may ask while the imports run; it waits in the backlog), import the
    engines, then fork a fork server for each worker that asks. Returns on SIGTERM or SIGINT."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a dead preloader's socket
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(umask)
    listener.listen(64)
    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_w, False)

    def stop(*_args):
        with contextlib.suppress(OSError):
            os.write(stop_w, b"x")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGCHLD, _reap)  # the fork servers it forked, when they end
    log.info("preloader_listening", socket=str(path))
    before = dict(os.environ)
    for module in PRELOAD:
        with contextlib.suppress(ImportError):  # llama-cpp-python absent: as in the worker's own fork server
            importlib.import_module(module)
    # What a worker's environment is compared with: the preloader's as it started. What the imports set (sklearn
    # sets KMP_DUPLICATE_LIB_OK and KMP_INIT_AT_FORK) is set again over each worker's, as its own imports would.
    own_env = import_environment(before)
    set_by_imports = {k: v for k, v in os.environ.items() if before.get(k) != v}
    log.info("preloader_ready", socket=str(path), modules=len(sys.modules))
    try:
        while True:
            ready, _, _ = select.select([listener, stop_r], [], [])
            if stop_r in ready:
                return 0
            try:
                with listener.accept()[0] as conn:
                    _answer(conn, [listener.fileno(), stop_r, stop_w], own_env, set_by_imports, log)
            except OSError as exc:  # the worker went away, or sent nothing in time
                log.warning("fork_server_request_dropped", error=str(exc))
            except Exception:  # noqa: BLE001 - a bad request never takes the preloader down
                log.exception("fork_server_request_failed")
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _reap(*_args) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _answer(conn: socket.socket, own_fds: list[int], own_env: dict[str, str], set_by_imports: dict[str, str],
            log) -> None:
    conn.settimeout(2)  # a worker sends its request as it connects
    data, fds, _flags, _address = socket.recv_fds(conn, 1 << 20, 8)
    try:
        try:
            request = _request_codec[1].decode(data)
            why = "" if len(fds) == 4 else f"expected 4 file descriptors, got {len(fds)}"
        except msgspec.DecodeError as exc:
            request, why = None, f"a malformed request: {exc}"
        why = why or refusal(request, own_env, set_by_imports)
        if why:
            log.warning("fork_server_refused", why=why)
            conn.send(_answer_codec[0].encode(ForkServerAnswer(refused=why)))
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                conn.close()
                for fd in own_fds:  # the preloader's listener and stop pipe
                    os.close(fd)
                code = _become_fork_server(request, fds, set_by_imports)
            except SystemExit as exc:  # forkserver.main: its worker and the worker's instances are gone
                code = exc.code if isinstance(exc.code, int) else 0
            except BaseException:
                sys.excepthook(*sys.exc_info())
            finally:
                os._exit(code)
        log.info("fork_server_forked", pid=pid)
        conn.send(_answer_codec[0].encode(ForkServerAnswer(pid=pid)))
    finally:
        for fd in fds:
            os.close(fd)


def _become_fork_server(request: ForkServerRequest, fds: list[int], set_by_imports: dict[str, str]) -> int:
    listener_fd, alive_r, out, err = fds
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env, **set_by_imports)
    for name in ("zinfer", ""):  # the preloader's log file is not the worker's (its instances make their own)
        logger = logging.getLogger(name)
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
            handler.close()
    forkserver.main(listener_fd, alive_r, [])  # the imports are done: no preload
    return 0


# ---------------------------------------------------------------- the worker's side


class PendingForkServer:
    """A worker's request to the preloader, sent as the worker starts. `take` (at the first launch) waits for the
    answer and installs the fork server as multiprocessing's, or returns why not."""

    def __init__(self, path: Path):
        self.listener = socket.socket(socket.AF_UNIX)
        self.address = connection.arbitrary_address("AF_UNIX")
        self.listener.bind(self.address)
        os.chmod(self.address, 0o600)
        self.listener.listen()
        self.alive_r, self.alive_w = os.pipe()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.sock.settimeout(10)
            self.sock.connect(str(path))
            request = ForkServerRequest(env=dict(os.environ), cwd=os.getcwd(), executable=sys.executable,
                                        version=sys.version, sys_path=list(sys.path))
            socket.send_fds(self.sock, [_request_codec[0].encode(request)],
                            [self.listener.fileno(), self.alive_r, 1, 2])
        except OSError:
            self.close()
            raise
        finally:
            os.close(self.alive_r)
            self.listener.close()  # the fork server holds its own copy

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self.alive_w)
        with contextlib.suppress(OSError):
            os.unlink(self.address)

    def take(self) -> str:
        """Wait for the answer; '' once the preloader's fork server is multiprocessing's, else why not."""
        try:
            self.sock.settimeout(ANSWER_TIMEOUT_S)
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("it closed the connection")
            answer = _answer_codec[1].decode(data)
        except (OSError, EOFError, msgspec.DecodeError) as exc:
            self.close()
            return f"no answer from the preloader ({exc})"
        self.sock.close()
        if answer.refused:
            self.close()
            return f"the preloader refused ({answer.refused})"
        try:
            pidfd = os.pidfd_open(answer.pid)
        except OSError as exc:
            self.close()
            return f"the fork server the preloader forked ({answer.pid}) is gone ({exc.strerror})"
        _install(self.address, self.alive_w, answer.pid, pidfd)
        return ""


def _install(address: str, alive_w: int, pid: int, pidfd: int) -> None:
    """Make the preloader's fork server multiprocessing's for this process, as `ensure_running` would have set it
    up. Its parent is the preloader, so liveness is read from a pidfd, not waitpid; if it ever ends, the next
    start goes back to multiprocessing's own `ensure_running`, which starts a new one."""
    server = forkserver._forkserver
    own_ensure_running = type(server).ensure_running
    lock = threading.Lock()

    def ensure_running():
        with lock:
            resource_tracker.ensure_running()
            if server._forkserver_pid == pid and not select.select([pidfd], [], [], 0)[0]:
                return
            if server._forkserver_pid == pid:  # gone: forget it
                structlog.get_logger().warning("fork_server_lost", pid=pid, then="the worker starts its own")
                os.close(server._forkserver_alive_fd)
                server._forkserver_address = server._forkserver_alive_fd = server._forkserver_pid = None
        own_ensure_running(server)

    with server._lock:
        server._forkserver_address, server._forkserver_alive_fd, server._forkserver_pid = address, alive_w, pid
    server.ensure_running = ensure_running


def supported() -> bool:
    """multiprocessing's fork server as this module knows it (CPython 3.11-3.13; 3.14 adds an auth key)."""
    server = getattr(forkserver, "_forkserver", None)
    return sys.version_info < (3, 14) and all(
        hasattr(server, a) for a in ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid", "_lock"))

"""The worker's instance processes: start one per replica, watch them, restart the ones that die, stop them.

How processes start: from a fork server (multiprocessing's "forkserver") that has imported torch, transformers,
sentence-transformers and llama.cpp before it forks anything. A plain spawn pays those imports in every new
process: 6.7-7.4 s on this project's 2-core machine (`python -c "import torch, transformers,
sentence_transformers, llama_cpp; from transformers import AutoModelForCausalLM"`), far over the 1.5 s a launch
may add to the raw load. A fork from the server costs milliseconds and shares the imported modules' pages. Forking
the worker itself is not safe (its ZeroMQ and pool threads); the fork server has one thread and has run no OpenMP
or CUDA code, so its children start clean. Where the host runs a preloader (`zinfer up` starts one; the
`preloader` setting names its socket), the worker's fork server is forked from it, its imports already done
(preloader.py); otherwise the worker starts its own at once, which imports them. It exits once the worker and its
instances are gone, and each child dies with it (PR_SET_PDEATHSIG).

The states of a replica here: launching (first load), ready, restarting (its process died and a new one loads
it, or the scheduler loads it again after the worker restarted), failed, terminating. A process that dies after
its instance was ready is started again after a back-off that doubles per crash; more than `restart_limit`
restarts within `restart_window_s` leave it failed with the last cause. A crash during a launch's first load
fails the launch at once (a model that kills its process while loading would only do so again).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections import deque
from multiprocessing import forkserver
from pathlib import Path

import msgspec
import psutil
import structlog

from zinfer.services.worker.host import preloader
from zinfer.services.worker.instance import child
from zinfer.services.worker.instance.instance import base_report
from zinfer.shared import instances
from zinfer.shared import protocol as p
from zinfer.shared.config import Settings
from zinfer.shared.errors import (
    Cancelled,
    Conflict,
    InternalError,
    ZinferError,
    error_from_reply,
    reply_from_exception,
)
from zinfer.shared.logs import log_name

log = structlog.get_logger()

MAX_BACKOFF_S = 30.0

_report_decoder = msgspec.msgpack.Decoder(instances.InstanceReport)
_encoder = msgspec.msgpack.Encoder()


class _ForkServer:
    """How this worker's fork server starts: asked of the preloader as the worker starts (the answer read before
    the first instance process), else its own at once. `origin` says which, for the log of the first launch."""

    lock = threading.Lock()
    started = False
    pending: preloader.PendingForkServer | None = None
    origin = ""


def start_fork_server(settings: Settings) -> multiprocessing.context.BaseContext:
    """This worker's fork server, asked for now (its imports take seconds: better at worker start than at the first
    launch): from the host's preloader (the `preloader` setting), else its own, started at once. Idempotent."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preloader.PRELOAD)
    with _ForkServer.lock:
        if _ForkServer.started:
            return ctx
        _ForkServer.started = True
        path, why = preloader.resolve(settings.preloader, settings.home_path)
        if path and not preloader.supported():
            why = f"this Python's multiprocessing is not the one the preloader knows ({sys.version.split()[0]})"
        elif path:
            try:
                _ForkServer.pending = preloader.PendingForkServer(path)
                return ctx
            except OSError as exc:
                why = f"no preloader answers at {path} ({exc.strerror or exc})"
        forkserver.ensure_running()
        _ForkServer.origin = f"its own: {why}"
    return ctx


def fork_server_ready() -> str:
    """Before an instance process starts: the preloader's answer read (and the worker's own fork server started
    if there was none to take). How the fork server started, the first time; '' after."""
    with _ForkServer.lock:
        pending, _ForkServer.pending = _ForkServer.pending, None
        if pending is not None:
            why = pending.take()
            if why:
                forkserver.ensure_running()
            _ForkServer.origin = f"its own: {why}" if why else "from the preloader"
        origin, _ForkServer.origin = _ForkServer.origin, ""
        return origin


def describe_exit(code: int | None, fault_text: str) -> str:
    """Why a process ended, for `zinfer list`: the signal or exit code, and where it was (faulthandler)."""
    if code is None:
        why = "its process vanished"
    elif code < 0:
        try:
            why = f"its process was killed by {signal.Signals(-code).name}"
        except ValueError:
            why = f"its process was killed by signal {-code}"
    else:
        why = f"its process exited with code {code}"
    frame = last_frame(fault_text)
    return f"{why} in {frame}" if frame else why


def last_frame(fault_text: str) -> str:
    """The innermost frame of the thread that faulted, from faulthandler's dump: 'step (llama_cpp_backend.py:300)'.
    Python 3.11's faulthandler shows Python frames; the innermost is the call into the native code that crashed.
    """
    lines = fault_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), None)
    if start is None:
        return ""
    for line in lines[start + 1:]:
        line = line.strip()
        if line.startswith('File "'):
            # File "/x/y/llama_cpp_backend.py", line 300 in step
            path, _, rest = line[len('File "'):].partition('", line ')
            number, _, func = rest.partition(" in ")
            return f"{func} ({os.path.basename(path)}:{number})"
    return ""


class ReplicaProcess:
    """One instance replica as the supervisor sees it: its launch, its current process, its history."""

    def __init__(self, load: p.LoadInstance, state: instances.InstanceState, cause: str = ""):
        self.load = load
        self.state: instances.InstanceState = state
        self.cause = cause  # why it last restarted
        self.error: ZinferError | None = None
        self.process: multiprocessing.Process | None = None
        self.conn = None
        self.report: instances.InstanceReport | None = None  # the process's last report
        self.crashes: deque[float] = deque()  # restart times within the window
        self.restarts = 0
        self.was_ready = bool(cause)  # a restore counts as having served: a crash while reloading restarts it
        self.next_start: float | None = None
        self.kill_at: float | None = None
        self.settled = threading.Event()  # ready or failed (what LoadInstance waits for)
        self.gone = threading.Event()  # terminated: no process left
        self.fault_path: Path | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.load.model_uid, self.load.replica

    def fail(self, error: ZinferError) -> None:
        self.state, self.error, self.next_start = "failed", error, None
        self.settled.set()


class Supervisor:
    def __init__(self, settings: Settings, worker_id: str, device: str, on_change):
        self.settings = settings
        self.worker_id = worker_id
        self.device = device  # the torch device inside the instance processes ("cpu", "cuda:0")
        self.on_change = on_change
        self.replicas: dict[tuple[str, int], ReplicaProcess] = {}
        self.lock = threading.RLock()
        self.spawn_lock = threading.Lock()
        self.running = True
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.faults = settings.home_path / "run" / "faults"
        self.faults.mkdir(parents=True, exist_ok=True)
        self.threads = settings.instance_threads  # 0: each engine's own default
        self.mp = start_fork_server(settings)
        self._settings_raw = _encoder.encode(settings)
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    # ------------------------------------------------------------------ launch (a pool thread)

    def launch(self, load: p.LoadInstance) -> None:
        """Start the replica's process and wait until its model is ready; raises the launch's error."""
        state = "restarting" if load.restore_cause else "launching"
        with self.lock:
            old = self.replicas.get((load.model_uid, load.replica))
        if old is not None and old.load.incarnation == load.incarnation and old.state != "terminating":
            replica = old  # the same launch asked again (a scheduler that restarted meanwhile): wait for it
        else:
            if old is not None:  # an older launch of this uid: it goes first, whatever it was doing
                self.stop([old])
            replica = ReplicaProcess(load, state, load.restore_cause)
            with self.lock:
                if (load.model_uid, load.replica) in self.replicas:
                    raise Conflict(f"model {load.model_uid!r} replica {load.replica} is already on {self.worker_id}")
                self.replicas[replica.key] = replica
            self._spawn(replica)
        if not replica.settled.wait(self.settings.launch_timeout):
            raise InternalError(f"model {load.model_uid!r} did not load within {self.settings.launch_timeout:g}s")
        if replica.state == "failed" and replica.error is not None:
            raise replica.error
        if replica.state == "terminating":
            raise Cancelled(f"the launch of {load.model_uid!r} was cancelled (terminated)")

    def _spawn(self, replica: ReplicaProcess) -> None:
        load = replica.load
        service = p.instance_service(self.worker_id, load.model_uid, load.replica)
        replica.fault_path = self.faults / f"{log_name(service)}.txt"
        replica.fault_path.write_text("")
        receiver, sender = self.mp.Pipe(duplex=False)
        process = self.mp.Process(
            target=child.main, name=service, daemon=False,
            args=(sender, self._settings_raw, _encoder.encode(load), service, self.device, str(replica.fault_path),
                  self.threads))
        try:
            with self.spawn_lock:
                origin = fork_server_ready()
                if origin:
                    log.info("fork_server", origin=origin)
                process.start()
        except Exception as exc:
            receiver.close()
            replica.fail(InternalError(f"could not start the process of {load.model_uid!r}: {exc}"))
            raise replica.error from None
        finally:
            sender.close()
        with self.lock:
            replica.process, replica.conn, replica.report, replica.next_start = process, receiver, None, None
            doomed = replica.state == "terminating"  # terminated while it started: stop() found no process yet
        if doomed:
            os.kill(process.pid, signal.SIGKILL)
            receiver.close()
            return
        log.info("instance_process_started", model_uid=load.model_uid, replica=load.replica, pid=process.pid,
                 state=replica.state)
        self.wake()
        self.on_change()

    # ------------------------------------------------------------------ terminate (a pool thread)

    def find(self, uid: str, incarnation: int = 0, replica: int | None = None) -> list[ReplicaProcess]:
        with self.lock:
            return [r for r in self.replicas.values() if r.load.model_uid == uid
                    and (not incarnation or r.load.incarnation == incarnation)
                    and (replica is None or r.load.replica == replica)]

    def stop(self, replicas: list[ReplicaProcess]) -> None:
        """SIGTERM each replica's process, SIGKILL after the grace period; returns once none is left."""
        with self.lock:
            for r in replicas:
                r.state, r.next_start = "terminating", None
                r.settled.set()
                if r.process is not None and r.process.exitcode is None:
                    r.kill_at = time.monotonic() + self.settings.terminate_grace_s
                    try:
                        os.kill(r.process.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                else:
                    r.gone.set()
        self.wake()
        for r in replicas:
            r.gone.wait(self.settings.terminate_grace_s + 10)
        with self.lock:
            for r in replicas:
                if self.replicas.get(r.key) is r:
                    del self.replicas[r.key]
        self.on_change()

    def close(self) -> None:
        """The worker is stopping: every instance process ends with it."""
        self.running = False
        with self.lock:
            replicas = list(self.replicas.values())
        self.stop(replicas)
        self.wake()

    # ------------------------------------------------------------------ reports

    def reports(self) -> tuple[list[instances.InstanceReport], int]:
        """Every replica's report, and the memory they hold (bytes) for the device's free pool."""
        out, used = [], 0
        with self.lock:
            replicas = list(self.replicas.values())
        for r in replicas:
            report = r.report if r.report is not None else base_report(r.load, r.state)
            pid = r.process.pid if r.process is not None and r.process.exitcode is None else 0
            memory = 0
            if pid and not self.device.startswith("cuda"):
                try:
                    memory = psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    memory = 0
            elif pid:
                memory = report.status.memory
            if pid and r.state in ("launching", "restarting"):
                memory = max(memory, r.load.memory_estimate)  # what it will hold once loaded
            used += memory
            # The supervisor's word on the life of the process; the process's on its engine.
            error = reply_from_exception(r.error) if r.error else report.status.error if r.state == "failed" else None
            status = msgspec.structs.replace(report.status, state=r.state, pid=pid, memory=memory,
                                             restarts=r.restarts, cause=r.cause, error=error)
            out.append(msgspec.structs.replace(report, incarnation=r.load.incarnation, status=status))
        return out, used

    # ------------------------------------------------------------------ the watch thread

    def _watch(self) -> None:
        while self.running or self.replicas:
            with self.lock:
                replicas = list(self.replicas.values())
            handles: dict = {self._wake_r: None}
            for r in replicas:
                if r.conn is not None:
                    handles[r.conn] = r
                if r.process is not None:
                    handles[r.process.sentinel] = r
            now = time.monotonic()
            deadlines = [t for r in replicas for t in (r.next_start, r.kill_at) if t is not None]
            timeout = max(0.0, min([self.settings.heartbeat_interval, *(t - now for t in deadlines)]))
            try:
                ready = multiprocessing.connection.wait(list(handles), timeout)
            except OSError:
                ready = []
            for handle in ready:
                r = handles.get(handle)
                if handle == self._wake_r:
                    os.read(self._wake_r, 4096)
                elif r is not None and handle is r.conn:
                    self._read(r)
                elif r is not None and r.process is not None and handle == r.process.sentinel:
                    self._exited(r)
            self._timers()

    def _read(self, r: ReplicaProcess) -> None:
        try:
            raw = r.conn.recv_bytes()
        except (EOFError, OSError):
            r.conn.close()
            r.conn = None
            return
        try:
            report = _report_decoder.decode(raw)
        except msgspec.DecodeError:
            log.error("instance_report_undecodable", model_uid=r.load.model_uid)
            return
        with self.lock:
            r.report = report
            if report.info.loras != r.load.loras:  # adapters loaded or unloaded at run time: a restart keeps them
                r.load = msgspec.structs.replace(r.load, loras=report.info.loras)
            if r.state in ("terminating", "failed"):
                return
            if report.status.state == "ready" and r.state != "ready":
                r.state, r.was_ready = "ready", True
                r.settled.set()
                log.info("instance_ready", model_uid=r.load.model_uid, replica=r.load.replica,
                         restarts=r.restarts)
            elif report.status.state == "failed":
                failure = report.status.error
                r.fail(error_from_reply(failure) if failure else InternalError("the instance failed without a cause"))
        self.on_change()

    def _exited(self, r: ReplicaProcess) -> None:
        process = r.process
        process.join(timeout=1)
        code = process.exitcode
        while r.conn is not None and r.conn.poll():  # what it said before it died (its failure, its last report)
            self._read(r)
        if r.conn is not None:
            r.conn.close()
        fault = ""
        if r.fault_path is not None:
            try:
                fault = r.fault_path.read_text(errors="replace")
            except OSError:
                pass
        with self.lock:
            r.process, r.conn, r.kill_at = None, None, None
            if r.state == "terminating":
                r.gone.set()
                return
            if r.state == "failed":  # a load that failed and said why: nothing to restart
                self.on_change()
                return
            cause = describe_exit(code, fault)
            log.error("instance_process_died", model_uid=r.load.model_uid, replica=r.load.replica, cause=cause,
                      fault=fault[-4000:] or None)
            if not r.was_ready:
                r.fail(InternalError(f"model {r.load.model_uid!r} could not load: {cause}"))
            else:
                now = time.monotonic()
                while r.crashes and now - r.crashes[0] > self.settings.restart_window_s:
                    r.crashes.popleft()
                if len(r.crashes) >= self.settings.restart_limit:
                    r.cause = cause
                    r.fail(InternalError(f"model {r.load.model_uid!r} restarted {len(r.crashes)} times in "
                                         f"{self.settings.restart_window_s:g}s (restart_limit); last: {cause}"))
                else:
                    delay = min(MAX_BACKOFF_S, self.settings.restart_backoff_s * 2 ** len(r.crashes))
                    r.crashes.append(now)
                    r.state, r.cause, r.report = "restarting", cause, None
                    r.settled.clear()
                    r.next_start = now + delay
        self.on_change()

    def _timers(self) -> None:
        now = time.monotonic()
        with self.lock:
            replicas = list(self.replicas.values())
        for r in replicas:
            if r.kill_at is not None and now >= r.kill_at and r.process is not None:
                log.warning("instance_killed", model_uid=r.load.model_uid, replica=r.load.replica,
                            grace_s=self.settings.terminate_grace_s)
                r.kill_at = None
                try:
                    os.kill(r.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            with self.lock:
                due = r.next_start is not None and now >= r.next_start and r.state == "restarting" and self.running
                if due:
                    r.next_start = None
                    r.restarts += 1
            if due:
                try:
                    self._spawn(r)
                except ZinferError as exc:
                    log.error("instance_restart_failed", model_uid=r.load.model_uid, error=str(exc))
                    self.on_change()

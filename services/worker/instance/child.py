"""One model instance replica in a process of its own: what the worker's supervisor starts for each replica.

The process joins the broker itself, with the worker's service key, as `worker/<worker>#<uid>/<replica>` and binds
`model/<uid>` once its model is loaded: requests go client -> broker -> this process, the same hops as when the
worker held every instance. It reports `ready` once loaded and accepted by the broker (which refuses it while
another live process holds its name; it fails with the broker's reason if that lasts). Its main thread loads the
model and then runs the compute loop (PyTorch's CPU kernels are 10-25% slower from a secondary thread); an I/O
thread owns the broker socket; a reporter thread sends the instance's report (state, progress, queue, counters) to
the supervisor over a pipe, at once on a change and every heartbeat interval otherwise.

A fault stays here: a native crash ends this process only (faulthandler writes every thread's stack to a file
the supervisor reads for the cause), the broker fails the requests it had in flight, and the supervisor starts it
again. It stops as soon as its worker is gone (a thread sees the report pipe break) and dies with its parent,
the fork server (PR_SET_PDEATHSIG), so no orphan keeps a model's memory or its names at the broker.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import select
import signal
import threading

import msgspec
import structlog

from zinfer.services.worker.instance.compute import ComputeLoop
from zinfer.services.worker.instance.instance import Instance
from zinfer.shared import protocol as p
from zinfer.shared.config import Settings
from zinfer.shared.errors import Unavailable
from zinfer.shared.logs import configure_logging
from zinfer.shared.transport import EXIT_DENIED, ServiceRuntime

log = structlog.get_logger()

_reports = msgspec.msgpack.Encoder()


def set_threads(threads: int) -> None:
    """CPU threads for this process's engine (the instance_threads setting): torch's intra-op pool (OpenMP) here,
    llama.cpp's n_threads through its backend. 0 keeps each engine's default: torch takes the cores; llama.cpp
    decodes with half of them and prefills with all (on 2 cores a one-token decode of the tiny model with two
    threads ran at 0.57x the one-thread raw loop: the threads meet at a barrier after every operation)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


class InstanceProcess:
    def __init__(self, conn, settings: Settings, load: p.LoadInstance, service: str, device: str, threads: int):
        self.conn = conn
        self.settings = settings
        self.load = load
        self.loop = ComputeLoop()
        self.report_now = threading.Event()
        self.instance = Instance(load, device, settings, self.loop, self.report_now.set, threads=threads)
        # queued on the batcher, answered later
        requests = (p.Generate, p.Chat, p.Embed, p.Rerank, p.RenderChat, p.Transcribe, p.Speak)
        handlers = {**dict.fromkeys(requests, self.instance.submit), p.LoadLora: self.instance.load_lora,
                    p.UnloadLora: self.instance.unload_lora}
        self.runtime = ServiceRuntime(service, settings, handlers, deferred=set(requests), max_workers=1)
        self.runtime.on_joined = self.report_now.set
        self._send_lock = threading.Lock()
        self.done = False

    def send_report(self) -> None:
        report = self.instance.report()
        if report.status.state == "ready" and not self.runtime.joined.is_set():
            # Loaded, but the broker has not accepted this process (yet): nothing routes to it, so it is not ready.
            # The broker refuses it while another live process holds its name (an instance on a host cut off that
            # has not expired); it retries each heartbeat interval, then gives up and exits.
            report.status.state, report.status.stage = "launching", "joining the broker"
        if self.instance.device.startswith("cuda"):
            report.status.memory = _cuda_memory()
        with self._send_lock:
            try:
                self.conn.send_bytes(_reports.encode(report))
            except OSError:  # the supervisor is gone: so are we (PR_SET_PDEATHSIG does it too)
                self.stop()

    def _report_loop(self) -> None:
        while not self.done:
            self.report_now.wait(self.settings.heartbeat_interval)
            self.report_now.clear()
            if not self.done:
                self.send_report()

    def _watch_worker(self) -> None:
        """Stop at once when the worker is gone (killed, crashed): the read end of the report pipe closes, and poll()
        says so on our write end (POLLERR). The report loop would find out only at its next report, and nothing else
        says it sooner: the fork server runs on while any instance holds multiprocessing's "alive" pipe, as each
        instance does, so PR_SET_PDEATHSIG fires only after this. An instance that lingered would hold its names at
        the broker against the instance the restarted worker starts for the same replica."""
        poller = select.poll()
        poller.register(self.conn.fileno(), 0)  # nothing asked: POLLERR and POLLHUP are reported anyway
        while not poller.poll():
            pass
        if not self.done:
            log.warning("worker_gone", model_uid=self.load.model_uid, replica=self.load.replica)
            self.stop()

    def stop(self, *_args) -> None:
        """SIGTERM: a launch in progress stops at its next step; a loaded instance stops serving."""
        self.instance.cancelled.set()
        self.runtime.stop()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the worker decides
        io = threading.Thread(target=self.runtime.serve, name="io", daemon=True)
        io.start()
        threading.Thread(target=self._report_loop, name="reporter", daemon=True).start()
        threading.Thread(target=self._watch_worker, name="worker-watch", daemon=True).start()
        log.info("instance_loading", model_uid=self.load.model_uid, replica=self.load.replica,
                 incarnation=self.load.incarnation)
        try:
            self.instance.load()
        except Exception as exc:
            self.instance.fail(exc)
            log.error("instance_failed", model_uid=self.load.model_uid, error=str(self.instance.error))
            self.done = True
            self.send_report()
            self.runtime.stop()
            io.join(timeout=5)
            return 0
        # Bound once loaded: until then requests wait at the broker (or go to other replicas), and a client told
        # "nothing serves it" hears the launch's state from the scheduler.
        self.runtime.bind(p.model_target(self.load.model_uid))
        self.report_now.set()
        log.info("instance_ready", model_uid=self.load.model_uid, replica=self.load.replica)
        self.loop.run(keep_going=io.is_alive)
        io.join()
        if self.runtime.exit_code == EXIT_DENIED:  # the broker kept refusing it: say why, as a failed load
            self.instance.fail(Unavailable(f"the broker did not let this instance join: {self.runtime.denied_reason}"))
            self.send_report()
        self.done = True
        self.instance.close()  # the loop has ended: its release runs here and now
        return 0


def _cuda_memory() -> int:
    """What this process holds on its GPU (PyTorch's caching allocator; the CUDA context is not counted)."""
    import torch

    return int(torch.cuda.memory_reserved()) if torch.cuda.is_initialized() else 0


def _die_with_parent() -> None:
    """SIGKILL when the process that forked us (the worker's fork server, which exits with the worker) ends."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(conn, settings_raw: bytes, load_raw: bytes, service: str, device: str, fault_path: str,
         threads: int) -> None:
    """The instance process's entry (run by the fork server, which has already imported torch and the engines)."""
    _die_with_parent()
    settings = msgspec.msgpack.decode(settings_raw, type=Settings)
    load = msgspec.msgpack.decode(load_raw, type=p.LoadInstance)
    configure_logging(service, settings.home_path, max_mb=settings.log_max_mb, backups=settings.log_backups)
    fault_file = open(fault_path, "w")  # noqa: SIM115 - held for the life of the process
    faulthandler.enable(file=fault_file, all_threads=True)
    set_threads(threads)
    process = InstanceProcess(conn, settings, load, service, device, threads)
    code = process.run()
    logging.shutdown()
    fault_file.close()
    os._exit(code)  # no atexit or finalizer work: the model's memory goes back to the system at once

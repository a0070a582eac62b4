"""The worker process: hosts model instances for one device and reports them to the scheduler.

Threads: the I/O thread (the service runtime) decodes requests, checks their limits and queues them on their
instance's engine (no pool thread per request); the main thread runs the compute loop (services/worker/
compute.py), where engines take turns; a few pool threads load and unload models; one reporter thread.
"""

from __future__ import annotations

import threading

import structlog

from services.worker import files
from services.worker.compute import ComputeLoop
from services.worker.device import DeviceProbe
from services.worker.instance import Instance
from shared import protocol as p
from shared.config import Settings
from shared.errors import Conflict, NotFound, ZinferError
from shared.transport import ServiceRuntime

log = structlog.get_logger()


class Worker:
    def __init__(self, settings: Settings, device: str, worker_id: str | None = None):
        self.settings = settings
        self.worker_id = worker_id or device
        self.probe = DeviceProbe(device, settings.cpu_memory_budget_mb, settings.endpoint)
        self.instances: dict[str, list[Instance]] = {}
        self.lock = threading.Lock()
        self.report_now = threading.Event()
        self.loop = ComputeLoop()
        self.runtime = ServiceRuntime(p.worker_service(self.worker_id), settings, self.handlers(), inline={p.Ping},
                                      deferred={p.Generate, p.Chat, p.Embed}, max_workers=4)
        self.runtime.on_reconnect = self.report_now.set
        self._reporter = threading.Thread(target=self._report_loop, name="reporter", daemon=True)

    def handlers(self) -> dict:
        submit = self.submit
        return {
            p.Ping: lambda msg, ctx: p.Pong(payload=msg.payload),
            p.LoadInstance: self.load,
            p.UnloadInstance: self.unload,
            p.ProbeFiles: self.probe_files,
            p.FindPaths: self.find_paths,
            p.Generate: submit,
            p.Chat: submit,
            p.Embed: submit,
        }

    # ------------------------------------------------------------------ requests (the I/O thread)

    def submit(self, msg, ctx) -> None:
        replicas = self.instances.get(msg.model_uid)
        if not replicas:
            raise NotFound(f"model {msg.model_uid!r} is not loaded on worker {self.worker_id}", field="model_uid")
        ready = [r for r in replicas if r.state == "ready"]
        (min(ready, key=Instance.inflight) if ready else replicas[0]).submit(msg, ctx)

    # ------------------------------------------------------------------ instances (pool threads)

    def load(self, msg: p.LoadInstance, ctx) -> p.Ok:
        ctx.require_service(p.SCHEDULER, "LoadInstance")
        instance = Instance(msg, self.probe.torch_device, self.settings, self.loop, self.report_now.set)
        with self.lock:
            replicas = self.instances.setdefault(msg.model_uid, [])
            if any(r.replica == msg.replica for r in replicas):
                raise Conflict(f"model {msg.model_uid!r} replica {msg.replica} is already on {self.worker_id}")
            replicas.append(instance)
        self.runtime.bind(p.model_target(msg.model_uid))  # from now on requests reach us (and hear "launching")
        self.report_now.set()
        log.info("instance_loading", model_uid=msg.model_uid, replica=msg.replica)
        try:
            instance.load()
        except Exception as exc:
            instance.fail(exc)
            log.error("instance_failed", model_uid=msg.model_uid, error=str(instance.error))
            self.report_now.set()
            raise
        log.info("instance_ready", model_uid=msg.model_uid, replica=msg.replica)
        self.report_now.set()
        return p.Ok(message=f"{msg.model_uid} ready on {self.worker_id}")

    def probe_files(self, msg: p.ProbeFiles, ctx) -> p.FileProbe:
        ctx.require_service(p.SCHEDULER, "ProbeFiles")
        return files.probe(msg, "cuda" if self.probe.kind == "cuda" else "cpu")

    def find_paths(self, msg: p.FindPaths, ctx) -> p.PathsFound:
        ctx.require_service(p.SCHEDULER, "FindPaths")
        return files.find_paths(msg)

    def unload(self, msg: p.UnloadInstance, ctx) -> p.Ok:
        ctx.require_service(p.SCHEDULER, "UnloadInstance")
        with self.lock:
            replicas = self.instances.pop(msg.model_uid, None)
        if not replicas:
            raise NotFound(f"model {msg.model_uid!r} is not loaded on worker {self.worker_id}")
        self.runtime.unbind(p.model_target(msg.model_uid))
        for r in replicas:
            r.close()
        self.report_now.set()
        log.info("instance_unloaded", model_uid=msg.model_uid)
        return p.Ok(message=f"{msg.model_uid} unloaded from {self.worker_id}")

    # ------------------------------------------------------------------ reports

    def report(self) -> p.WorkerReport:
        with self.lock:
            replicas = [r for rs in self.instances.values() for r in rs]
        used = sum(r.spec.memory_estimate for r in replicas if r.state in ("launching", "ready"))
        return p.WorkerReport(device=self.probe.info(self.worker_id, used),
                              instances=[r.report() for r in replicas])

    def _report_loop(self) -> None:
        self.runtime.connected.wait()
        while self.runtime.running:
            self.report_now.wait(self.settings.heartbeat_interval)
            self.report_now.clear()
            try:
                # Sent as this worker (its registered socket): the scheduler takes reports from their worker only.
                self.runtime.call(p.SCHEDULER, self.report(), timeout=max(2.0, self.settings.liveness_s))
            except ZinferError as exc:
                log.debug("report_failed", error=str(exc))
            except Exception:
                log.exception("report_failed")

    def serve(self) -> None:
        self._reporter.start()
        self.runtime.install_signal_handlers()
        # The ZeroMQ loop in a thread; the main thread computes (see compute.py).
        io = threading.Thread(target=self.runtime.serve, name="io")
        io.start()
        self.loop.run(keep_going=io.is_alive)
        io.join()
        with self.lock:
            for replicas in self.instances.values():
                for r in replicas:
                    r.close()


def run_worker(settings: Settings, device: str, worker_id: str | None = None) -> int:
    worker = Worker(settings, device, worker_id)
    worker.serve()
    return worker.runtime.exit_code

"""The worker process: the supervisor of one device's model instances, and their voice to the scheduler.

It probes files and memory for the scheduler, starts one process per instance replica (services/worker/
supervisor.py; each serves its requests itself, services/worker/instance/child.py), restarts the ones that die, stops
them on terminate, and reports them every heartbeat interval and at once on a change. It runs no model itself:
one model's crash never takes its neighbours down. Threads: the I/O thread (the service runtime), pool threads
for loads and unloads (each waits for its processes), the supervisor's watch thread, one reporter thread.
"""

from __future__ import annotations

import threading

import structlog

from zinfer.services.worker import adapters, files
from zinfer.services.worker.host.device import DeviceProbe
from zinfer.services.worker.host.supervisor import Supervisor
from zinfer.shared import instances
from zinfer.shared import protocol as p
from zinfer.shared.config import Settings
from zinfer.shared.errors import Forbidden, NotFound, ZinferError
from zinfer.shared.transport import ServiceRuntime, handlers_of

log = structlog.get_logger()


class Worker:
    def __init__(self, settings: Settings, device: str, worker_id: str | None = None):
        self.settings = settings
        self.worker_id = worker_id or device
        self.probe = DeviceProbe(device, settings.cpu_memory_budget_mb, settings.endpoint)
        self.report_now = threading.Event()
        self.runtime = ServiceRuntime(p.worker_service(self.worker_id), settings, self.handlers(), max_workers=16)
        self.runtime.on_reconnect = self.report_now.set
        self.instances = Supervisor(settings, self.worker_id, self.probe.torch_device, self.report_now.set)
        self._reporter = threading.Thread(target=self._report_loop, name="reporter", daemon=True)

    def handlers(self) -> dict:
        return handlers_of(self, (p.LoadInstance, p.UnloadInstance, p.ProbeFiles, p.FindPaths))

    # ------------------------------------------------------------------ instances (pool threads)

    def load_instance(self, msg: p.LoadInstance, ctx) -> p.Ok:
        ctx.require_service(p.SCHEDULER, "LoadInstance")
        name = instances.info_of(msg).model_name  # an LLM's, an embedding's or a rerank model's
        if msg.options.trust_remote_code and name not in self.settings.trust_remote_code_models:
            raise Forbidden(f"trust_remote_code: model {name!r} may not run its own code on this worker (not in its "
                            "trust_remote_code_models setting)", field="trust_remote_code")
        log.info("instance_loading", model_uid=msg.model_uid, replica=msg.replica, incarnation=msg.incarnation)
        try:
            self.instances.launch(msg)
        except ZinferError as exc:
            log.error("instance_failed", model_uid=msg.model_uid, error=str(exc))
            raise
        return p.Ok(message=f"{msg.model_uid} ready on {self.worker_id}")

    def probe_files(self, msg: p.ProbeFiles, ctx) -> p.FileProbe:
        ctx.require_service(p.SCHEDULER, "ProbeFiles")
        return adapters.probed(msg, files.probe(msg, "cuda" if self.probe.kind == "cuda" else "cpu"))

    def find_paths(self, msg: p.FindPaths, ctx) -> p.PathsFound:
        ctx.require_service(p.SCHEDULER, "FindPaths")
        return files.find_paths(msg)

    def unload_instance(self, msg: p.UnloadInstance, ctx) -> p.Ok:
        """Terminate the uid's replicas of that launch: their processes are gone when this answers."""
        ctx.require_service(p.SCHEDULER, "UnloadInstance")
        replicas = self.instances.find(msg.model_uid, msg.incarnation, msg.replica)
        if not replicas:
            raise NotFound(f"model {msg.model_uid!r} is not loaded on worker {self.worker_id}")
        self.instances.stop(replicas)
        log.info("instance_unloaded", model_uid=msg.model_uid, incarnation=msg.incarnation)
        return p.Ok(message=f"{msg.model_uid} unloaded from {self.worker_id}")

    # ------------------------------------------------------------------ reports

    def report(self) -> p.WorkerReport:
        instances, used = self.instances.reports()
        return p.WorkerReport(device=self.probe.info(self.worker_id, used), instances=instances)

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
        try:
            self.runtime.serve()
        finally:
            self.instances.close()


def run_worker(settings: Settings, device: str, worker_id: str | None = None) -> int:
    worker = Worker(settings, device, worker_id)
    worker.serve()
    return worker.runtime.exit_code

"""Scheduler handlers: launch (match spec, place, load on workers), list, describe, terminate; and the desired
state that brings instances back by themselves.

What was launched (each replica's LoadInstance, its worker, the launch's incarnation and placement pins) is the
desired state, written to <home>/scheduler/launched.json at each launch, move and terminate, so it survives a
scheduler restart. Workers are the source of truth for what is loaded: each reports its device and instances
every heartbeat interval, and a replica the worker holds takes the state the worker gives it. A replica that its
worker does not hold (the worker restarted) is `restarting` and loaded there again; a worker silent for the
liveness period has its replicas `restarting` until it returns, and after `worker_return_s` they are loaded on
another worker that can hold them. Reports about an older launch of a uid (another incarnation) never touch
the current one: such leftovers are unloaded.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import structlog

from zinfer.services.scheduler.book import (
    LastLaunches,
    LaunchBook,
    LaunchRecord,
    Model,
    Pins,
    Replica,
    WorkerState,
    release,
    view,
)
from zinfer.services.scheduler.lifecycle import Lifecycle
from zinfer.services.scheduler.placement import (
    choose_embedding,
    launch_options,
    match_spec,
    place,
    slots_of,
    with_path,
)
from zinfer.shared import engines, instances
from zinfer.shared import protocol as p
from zinfer.shared.config import Settings
from zinfer.shared.errors import (
    Cancelled,
    Conflict,
    InvalidRequest,
    NotFound,
    RequestTimeout,
    TooLarge,
    Unavailable,
    ZinferError,
)
from zinfer.shared.models import (
    MODEL_TYPES,
    RERANK_TYPES_SERVED,
    EmbeddingFamily,
    LLMFamily,
    RerankFamily,
    check_name,
)
from zinfer.shared.transport import ServiceRuntime

log = structlog.get_logger()


class Scheduler(Lifecycle):
    def __init__(self, settings: Settings):
        self.settings = settings
        self.lock = threading.RLock()
        self.workers: dict[str, WorkerState] = {}
        self.models: dict[str, Model] = {}
        self.bus: ServiceRuntime | None = None  # set by run_scheduler: calls go out as the scheduler
        self.running = True
        # uid -> when it was terminated: a report sent before the unload must not bring it back.
        self.terminated: dict[str, float] = {}
        self.started = time.monotonic()
        self.book = LaunchBook(settings.home_path)
        self._snapshots = itertools.count(1)  # the launch book's snapshots, numbered as they are taken
        self.last_launch = LastLaunches(settings.home_path)
        self.wake_reconciler = threading.Event()
        for record in self.book.load():
            self.models[record.uid] = record.model()

    def _record(self) -> None:
        """Write the launch book from the current models (call without holding self.lock)."""
        with self.lock:
            records = [LaunchRecord.of(m) for m in self.models.values()]
            seq = next(self._snapshots)
        self.book.save(records, seq)

    def handlers(self) -> dict:
        return {
            p.Ping: lambda msg, ctx: p.Pong(payload=msg.payload),
            p.WorkerReport: self.on_report,
            p.LaunchModel: self.launch,
            p.WakeModel: self.wake,
            p.KeepAlive: self.keep_alive,
            p.ListModels: self.list_models,
            p.DescribeModel: self.describe,
            p.TerminateModel: self.terminate,
            p.InstancesOf: self.instances_of,
            p.FindPaths: self.find_paths,
            p.SchedulerStatus: self.status,
        }

    # KeepAlive is not among them: it writes the launch book (an fsync), which must not hold up the I/O thread.
    inline = {p.Ping, p.WorkerReport, p.ListModels, p.DescribeModel, p.InstancesOf, p.SchedulerStatus}

    # ------------------------------------------------------------------ workers

    def on_report(self, msg: p.WorkerReport, ctx) -> p.Ok:
        now = time.monotonic()
        wid = msg.device.worker_id
        ctx.require_service(p.worker_service(wid), f"a report for worker {wid!r}")
        stale: list[p.UnloadInstance] = []
        with self.lock:
            state = self.workers.get(wid)
            restarted = state is not None and state.info.pid != msg.device.pid
            if state is None or restarted:
                log.info("worker_joined", worker=wid, device=msg.device.device, free=msg.device.free_memory,
                         restarted=restarted)
                state = self.workers[wid] = WorkerState(msg.device, now, reserved=state.reserved if state else {})
            state.info, state.last_seen = msg.device, now
            held = set()
            for inst in msg.instances:
                state.reserved.pop((inst.model_uid, inst.replica), None)  # the worker counts it now
                model = self.models.get(inst.model_uid)
                if model is None and now - self.terminated.get(inst.model_uid, -1e9) < self.settings.liveness_s:
                    continue  # a report sent before its unload
                if model is None:  # known to the worker, not to us (our launch book was lost): adopt it
                    model = Model(uid=inst.model_uid, info=inst.info, incarnation=inst.incarnation)
                    self.models[inst.model_uid] = model
                replica = next((r for r in model.replicas if r.index == inst.replica), None)
                if (inst.incarnation != model.incarnation or model.terminating
                        or (model.unloaded and not model.waking)
                        or (replica is not None and replica.worker_id != wid)):
                    # An older launch of this uid, or a replica that has moved on: never the current one.
                    stale.append(p.UnloadInstance(model_uid=inst.model_uid, incarnation=inst.incarnation,
                                                  replica=inst.replica))
                    continue
                held.add((inst.model_uid, inst.replica))
                model.info, model.from_book = inst.info, False
                if replica is None:
                    replica = Replica(worker_id=wid, index=inst.replica)
                    model.replicas.append(replica)
                status = inst.status  # the worker's word, whatever we thought before (but an earlier cause)
                if not status.cause:
                    status.cause = replica.status.cause
                replica.status, replica.needs_load, replica.lost_since = status, False, None
            for model in self.models.values():
                if model.terminating or model.error or model.unloaded:
                    continue
                for r in model.replicas:
                    if (r.worker_id == wid and (model.uid, r.index) not in held and r.state != "failed"
                            and not r.loading and (model.uid, r.index) not in state.reserved):
                        why = f"worker {wid} restarted" if restarted or r.state in ("ready", "launching") \
                            else r.status.cause or f"worker {wid} does not hold it"
                        self.lost_from_book(model, r, why)
        for unload in stale:
            threading.Thread(target=self._unload_stale, args=(wid, unload), daemon=True).start()
        if any(r.needs_load for m in self.models.values() for r in m.replicas):
            self.wake_reconciler.set()
        return p.Ok()

    def _unload_stale(self, wid: str, unload: p.UnloadInstance) -> None:
        log.info("unloading_stale_instance", worker=wid, model_uid=unload.model_uid, incarnation=unload.incarnation)
        try:
            self.bus.call(p.worker_service(wid), unload, timeout=60)
        except ZinferError as exc:
            log.warning("stale_unload_failed", worker=wid, model_uid=unload.model_uid, error=str(exc))

    def expire_workers(self) -> None:
        while self.running:
            time.sleep(self.settings.heartbeat_interval)
            try:
                self.expire_idle()
            except Exception:  # never the end of this loop
                log.exception("expire_idle_failed")
            now = time.monotonic()
            with self.lock:
                for wid, state in list(self.workers.items()):
                    if now - state.last_seen > self.settings.liveness_s:
                        del self.workers[wid]
                        why = f"worker {wid} stopped reporting (nothing for {self.settings.liveness_s:g}s)"
                        for model in self.models.values():
                            for r in model.replicas:
                                if r.worker_id == wid and r.state not in ("failed", "idle-unloaded") \
                                        and not model.terminating:
                                    r.restart(why)
                                    r.lost_since = now
                        log.warning("worker_lost", worker=wid)
                if now - self.started > self.settings.liveness_s:  # launches remembered from before a restart
                    for model in self.models.values():
                        for r in model.replicas:
                            if (r.worker_id not in self.workers and r.state in ("launching", "ready")
                                    and not model.terminating and not model.error and not r.loading
                                    and not model.unloaded):
                                self.lost_from_book(model, r, f"worker {r.worker_id} has not reported since the "
                                                              "scheduler restarted")
                                r.lost_since = now

    # ------------------------------------------------------------------ desired state

    def reconcile(self) -> None:
        """Load what is desired but not held: on its worker when that worker is there, on another one when its
        worker has been gone for worker_return_s. Runs every heartbeat interval, and at once after a report
        that found something missing."""
        while self.running:
            self.wake_reconciler.wait(self.settings.heartbeat_interval)
            self.wake_reconciler.clear()
            now = time.monotonic()
            todo: list[tuple[Model, Replica, str]] = []
            with self.lock:
                for model in self.models.values():
                    if model.terminating or model.error or model.unloaded:
                        continue
                    for r in model.replicas:
                        if not r.needs_load or r.loading or now < r.next_try or r.load is None:
                            continue
                        if r.worker_id in self.workers:
                            r.loading = True
                            todo.append((model, r, "restore"))
                        elif r.lost_since is not None and now - r.lost_since >= self.settings.worker_return_s:
                            r.loading = True
                            todo.append((model, r, "move"))
            for model, r, what in todo:
                target = self._restore if what == "restore" else self._move
                threading.Thread(target=target, args=(model, r), daemon=True).start()

    def _restore(self, model: Model, r: Replica) -> None:
        """Load a desired replica on its worker again; a refusal that will not change fails it, others retry."""
        with self.lock:
            load = msgspec.structs.replace(r.load, restore_cause=r.status.cause or "restored")
            wid = r.worker_id
            r.restores += 1
        log.info("restoring_instance", model_uid=model.uid, replica=r.index, worker=wid, cause=load.restore_cause)
        try:
            self.bus.call(p.worker_service(wid), load, timeout=self.settings.launch_timeout)
        except ZinferError as exc:
            with self.lock:
                r.loading = False
                if model.incarnation != load.incarnation or model.terminating:
                    return
                if isinstance(exc, Unavailable | RequestTimeout | Cancelled):  # the worker could not now: again later
                    r.next_try = time.monotonic() + max(2.0, self.settings.liveness_s)
                    log.warning("restore_failed", model_uid=model.uid, worker=wid, error=str(exc))
                else:
                    r.fail(exc.message, exc.code, exc.field)
            return
        with self.lock:
            r.loading = False
            if r.state == "restarting" and model.incarnation == load.incarnation:
                r.status.state, r.status.progress, r.needs_load = "ready", 1.0, False
                model.last_active = time.time()
        log.info("restored_instance", model_uid=model.uid, replica=r.index, worker=wid)

    def _move(self, model: Model, r: Replica) -> None:
        """Its worker has not come back: place the replica on another worker that has the files and the memory."""
        load = r.load
        lost = r.worker_id
        try:
            found = self._ask_workers(p.ProbeFiles(model_type=load.model_type, spec=load.spec,
                                                   quantization=load.quantization, embedding=load.embedding,
                                                   rerank=load.rerank),
                                      10.0, "probe")
            with self.lock:
                slots = slots_of(self.workers, found)
                if not slots:
                    raise Unavailable("no other worker can take it now")
                pins = model.pins
                wid = place(slots, 1, pins.n_gpu, pins.gpu_idx, pins.devices, pins.worker_ip)[0]
                if model.terminating or model.incarnation != load.incarnation:
                    r.loading = False
                    return
                r.worker_id, r.lost_since, r.lost_cause = wid, None, ""
                r.load = msgspec.structs.replace(load, memory_estimate=found[wid].memory)
                r.status.cause = f"{r.status.cause}; moved from {lost} to {wid}"
                self.workers[wid].reserved[(model.uid, r.index)] = found[wid].memory
            self._record()
        except ZinferError as exc:
            with self.lock:
                r.loading = False
                r.next_try = time.monotonic() + max(5.0, self.settings.worker_return_s / 4)
                r.lost_cause = r.lost_cause or r.status.cause  # why it is restarting, before any failed move
                r.status.cause = f"{r.lost_cause}; no other worker can take it yet: {exc.message}"
            log.warning("move_failed", model_uid=model.uid, replica=r.index, error=str(exc))
            return
        log.info("moving_instance", model_uid=model.uid, replica=r.index, from_worker=lost, to_worker=wid)
        self._restore(model, r)

    def status(self, msg, ctx) -> p.SchedulerStatusReply:
        with self.lock:
            return p.SchedulerStatusReply(workers=[w.info for w in self.workers.values()],
                                          instances=len(self.models))

    # ------------------------------------------------------------------ launch

    def _registration(self, model_type: str, model_name: str) -> LLMFamily | EmbeddingFamily | RerankFamily:
        """The definition to launch, typed and complete (the registry resolves its prompt style and template)."""
        reply = self.bus.call(p.REGISTRY, p.GetRegistration(model_type=model_type, model_name=model_name,
                                                            resolved=True))
        family = {"LLM": reply.llm, "embedding": reply.embedding, "rerank": reply.rerank}[model_type]
        if family is None:
            raise InvalidRequest(f"the registry has no launchable {model_type} definition of {model_name!r}",
                                 field="model_name")
        return family

    def launch(self, msg: p.LaunchModel, ctx) -> p.Launched:
        if msg.model_type not in MODEL_TYPES:
            raise InvalidRequest(f"model_type {msg.model_type!r} must be one of {', '.join(MODEL_TYPES)}",
                                 field="model_type")
        if msg.replica < 1:
            raise InvalidRequest(f"replica must be >= 1, got {msg.replica}", field="replica")
        uid = msg.model_uid or msg.model_name
        problem = check_name(uid, "model_uid")
        if problem:
            raise InvalidRequest(problem.message, field="model_uid")
        options = launch_options(msg, self.settings.trust_remote_code_models)
        keep_alive = self.resolve_keep_alive(msg.keep_alive)
        formats = engines.formats_of(msg.model_engine, msg.model_type)
        if formats is not None and msg.model_format is not None and msg.model_type == "LLM" \
                and msg.model_format not in formats:
            raise InvalidRequest(f"model_engine {msg.model_engine!r} does not run model_format {msg.model_format!r} "
                                 f"(it runs {', '.join(formats)})", field="model_engine")
        family = self._registration(msg.model_type, msg.model_name)
        if msg.model_path is not None:
            family = with_path(family, msg.model_path)
        incarnation = time.time_ns()  # this launch's own number, unique across scheduler restarts
        if isinstance(family, LLMFamily):
            spec, quant = match_spec(family, msg.model_format, msg.model_size_in_billions, msg.quantization,
                                     None if msg.model_type == "embedding" else formats)
            probe = p.ProbeFiles(model_type="LLM", spec=spec, quantization=quant,
                                 read_context=msg.model_path is not None)
            base = p.LoadInstance(model_uid=uid, model_type="LLM", llm=family, spec=spec, quantization=quant,
                                  options=options, incarnation=incarnation, model_path=msg.model_path or "")
            engines.check_options(options, engines.for_model("LLM", spec.model_format))
        else:
            if isinstance(family, EmbeddingFamily):
                family = choose_embedding(family, msg.model_format, msg.quantization, formats)
            elif msg.model_format not in (None, "pytorch") or msg.quantization not in (None, "none"):
                raise InvalidRequest(f"{msg.model_type} models run in model_format pytorch with quantization "
                                     "none", field="model_format" if msg.model_format not in (None, "pytorch")
                                     else "quantization")
            folder = {msg.model_type: family}
            if isinstance(family, RerankFamily) and family.type not in RERANK_TYPES_SERVED:
                raise InvalidRequest(f"type {family.type!r}: zinfer runs rerank models of type normal (on "
                                     "sentence-transformers' CrossEncoder), or unknown when the model turns out "
                                     f"normal; {family.type} rerankers are not supported yet", field="type")
            probe = p.ProbeFiles(model_type=msg.model_type, **folder)
            base = p.LoadInstance(model_uid=uid, model_type=msg.model_type, options=options,
                                  incarnation=incarnation, model_path=msg.model_path or "", **folder)
            engines.check_options(options, engines.for_model(msg.model_type,
                                                              engines.model_format(msg.model_type, family)))
        with self.lock:
            if uid in self.models:
                raise Conflict(f"model uid {uid!r} is already in use ({self.models[uid].state}); terminate it "
                               "or pass another model_uid", field="model_uid")
        # Files first (each worker looks on its own host, and sizes the instance from what it finds), then memory.
        found = self._probe(probe)
        for reply in found.values() if msg.model_path is not None else ():  # said of the path the caller gave
            if not reply.ok and (reply.field or "").endswith("model_uri"):
                reply.field, reply.problem = "model_path", reply.problem.replace("model_uri", "model_path")
                reply.code = "invalid"  # the caller's path is the request's fault: a 400, not a missing model
        with self.lock:
            if uid in self.models:
                raise Conflict(f"model uid {uid!r} is already in use ({self.models[uid].state}); terminate it "
                               "or pass another model_uid", field="model_uid")
            slots = slots_of(self.workers, found)
            if not slots:
                raise Unavailable("no worker answered (they are restarting, or too busy to answer in 10 s)")
            chosen = place(slots, msg.replica, msg.n_gpu, msg.gpu_idx, msg.devices, msg.worker_ip)
            need = {wid: found[wid].memory for wid in chosen}
            if base.llm is not None and found[chosen[0]].context_length:  # by path: the files' context length
                base.llm = msgspec.structs.replace(base.llm, context_length=found[chosen[0]].context_length)
            model = Model(uid=uid, info=instances.info_of(base), incarnation=incarnation,
                          pins=Pins(n_gpu=msg.n_gpu, gpu_idx=msg.gpu_idx, devices=msg.devices,
                                    worker_ip=msg.worker_ip),
                          keep_alive=keep_alive, restore=msg.restore, last_active=time.time())
            loads = []
            for index, wid in enumerate(chosen):
                self.workers[wid].reserved[(uid, index)] = need[wid]
                load = msgspec.structs.replace(base, replica=index, memory_estimate=need[wid])
                model.replicas.append(Replica(worker_id=wid, index=index, load=load, loading=True,
                                              status=instances.ReplicaStatus(memory=need[wid])))
                loads.append((wid, load))
            self.models[uid] = model
        try:
            self._record()  # acknowledged launches survive a scheduler restart
        except ZinferError:
            with self.lock:
                self.models.pop(uid, None)
                release(self.workers, chosen, uid)
            raise
        self.last_launch.put(msg)
        self.make_room_for_launch(uid, chosen)
        log.info("launching", model_uid=uid, workers=chosen, need=need)
        threading.Thread(target=self._load_all, args=(model, loads), daemon=True).start()
        return p.Launched(model_uid=uid)

    def _ask_workers(self, msg: p.Msg, timeout: float, what: str) -> dict[str, p.Msg]:
        """Send msg to every worker (16 at a time); their replies by worker id. A worker that cannot answer now
        is left out (logged)."""
        with self.lock:
            workers = list(self.workers)
        replies: dict[str, p.Msg] = {}
        if not workers:
            return replies
        with ThreadPoolExecutor(max_workers=min(16, len(workers))) as pool:
            futures = {wid: pool.submit(self.bus.call, p.worker_service(wid), msg, timeout) for wid in workers}
            for wid, future in futures.items():
                try:
                    replies[wid] = future.result()
                except ZinferError as exc:
                    log.warning(f"{what}_failed", worker=wid, error=str(exc))
        return replies

    def _probe(self, probe: p.ProbeFiles) -> dict[str, p.FileProbe]:
        """Ask every worker whether it has the files and what one instance needs there; one that cannot answer
        now is no candidate."""
        with self.lock:
            if not self.workers:
                raise TooLarge("no worker is running", field="n_gpu")
        return self._ask_workers(probe, 10.0, "probe")

    def find_paths(self, msg: p.FindPaths, ctx) -> p.PathsFound:
        """Which workers' hosts have these paths; the registry checks a model_uri that its own host lacks this
        way. Workers that do not answer in time count as not having them."""
        ctx.require_service(p.REGISTRY, "FindPaths")
        if len(msg.dirs) + len(msg.files) > 256:
            raise InvalidRequest("FindPaths: at most 256 paths", field="files")
        found: dict[str, list[str]] = {}
        hosts: list[str] = []
        for reply in self._ask_workers(msg, 5.0, "find_paths").values():
            for path, where in reply.found.items():
                found.setdefault(path, []).extend(h for h in where if h not in found.get(path, []))
            hosts += [h for h in reply.hosts if h not in hosts]
        return p.PathsFound(found=found, hosts=hosts)

    def _load_all(self, model: Model, loads: list[tuple[str, p.LoadInstance]]) -> None:
        errors: list[ZinferError] = []

        def load_one(wid: str, load: p.LoadInstance, replica: Replica) -> None:
            try:
                self.bus.call(p.worker_service(wid), load, timeout=self.settings.launch_timeout)
            except ZinferError as exc:
                with self.lock:
                    replica.fail(exc.message, exc.code, exc.field)
                errors.append(exc)
            finally:
                with self.lock:  # the reconciler reads it under the lock
                    replica.loading = False

        threads = [threading.Thread(target=load_one, args=(wid, load, model.replicas[i]), daemon=True)
                   for i, (wid, load) in enumerate(loads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with self.lock:
            for wid, load in loads:
                if wid in self.workers:
                    self.workers[wid].reserved.pop((model.uid, load.replica), None)
            if not errors:
                for r in model.replicas:
                    if r.state == "launching":
                        r.status.state, r.status.progress = "ready", 1.0
                model.last_active = time.time()  # keep_alive counts from when it is ready
                log.info("launched", model_uid=model.uid)
                return
            first = errors[0]
            model.launch_failed(first)
        log.error("launch_failed", model_uid=model.uid, error=str(first))
        try:
            self._record()
        except ZinferError as exc:
            log.error("launch_book_write_failed", error=str(exc))
        # Nothing half-loaded: the replicas that did load are unloaded again (this launch's only: a relaunch of
        # the uid that comes meanwhile is another incarnation, which this never touches).
        for wid, _load in loads:
            try:
                self.bus.call(p.worker_service(wid), p.UnloadInstance(model_uid=model.uid,
                                                                      incarnation=model.incarnation), timeout=30)
            except ZinferError:
                pass

    # ------------------------------------------------------------------ views, terminate

    def list_models(self, msg, ctx) -> p.ModelList:
        with self.lock:
            return p.ModelList(models=[view(m, self.workers) for m in self.models.values()])

    def describe(self, msg: p.DescribeModel, ctx) -> p.ModelDescription:
        with self.lock:
            model = self.models.get(msg.model_uid)
            if model is None:
                raise NotFound(f"no launched model has uid {msg.model_uid!r}", field="model_uid")
            return p.ModelDescription(model=view(model, self.workers))

    def instances_of(self, msg: p.InstancesOf, ctx) -> p.UidList:
        with self.lock:
            return p.UidList(model_uids=[uid for uid, m in self.models.items()
                                         if (m.info.model_name, m.info.model_type) == (msg.model_name, msg.model_type)])

    def terminate(self, msg: p.TerminateModel, ctx) -> p.Ok:
        with self.lock:
            model = self.models.get(msg.model_uid)
            if model is None:
                raise NotFound(f"no launched model has uid {msg.model_uid!r}", field="model_uid")
            model.terminating = True
            workers = sorted({r.worker_id for r in model.replicas})
        unload = p.UnloadInstance(model_uid=msg.model_uid, incarnation=model.incarnation)
        for wid in workers:
            try:
                self.bus.call(p.worker_service(wid), unload,
                              timeout=60 + self.settings.terminate_grace_s)
            except NotFound:
                pass  # never loaded there, or already gone
            except ZinferError as exc:
                if wid in self.workers and exc.code not in ("unavailable", "no_route"):
                    with self.lock:
                        model.terminating = False
                    raise
        with self.lock:
            self.models.pop(msg.model_uid, None)
            self.terminated[msg.model_uid] = time.monotonic()
            release(self.workers, workers, msg.model_uid)
        self._record()
        log.info("terminated", model_uid=msg.model_uid)
        return p.Ok(message=f"terminated {msg.model_uid}")


def run_scheduler(settings: Settings) -> int:
    scheduler = Scheduler(settings)
    runtime = ServiceRuntime(p.SCHEDULER, settings, scheduler.handlers(), inline=Scheduler.inline)
    scheduler.bus = runtime
    threading.Thread(target=scheduler.expire_workers, name="expire", daemon=True).start()
    threading.Thread(target=scheduler.reconcile, name="reconcile", daemon=True).start()
    runtime.install_signal_handlers()
    runtime.serve()
    scheduler.running = False
    return runtime.exit_code

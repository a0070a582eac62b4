"""Scheduler handlers: launch (match spec, place, load on workers), list, describe, terminate.

Workers are the source of truth for what is loaded: each reports its device and instances every heartbeat
interval, and every report rewrites the scheduler's view of that worker: a replica the worker holds takes the
state the worker gives it (so it is `ready` again after any outage: a broker restart, a busy machine that
delayed reports), and a replica it does not hold, with no load on the way, is `failed` with the reason. A
restarted scheduler rebuilds its view the same way. A worker silent for the liveness period is dropped (its
replicas failed) until it reports again.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog

from services.registry import catalog
from services.scheduler.placement import (
    Slot,
    check_engine_options,
    engine_formats,
    engine_of,
    match_spec,
    place,
)
from shared import protocol as p
from shared.compat import engine_options
from shared.config import Settings
from shared.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    TooLarge,
    Unavailable,
    ZinferError,
    error_class,
    storage_error,
)
from shared.models import (
    EmbeddingFamily,
    LLMFamily,
    check_name,
    parse_embedding,
    parse_llm,
)
from shared.transport import ServiceRuntime

log = structlog.get_logger()


@dataclass
class Replica:
    worker_id: str
    index: int
    state: str = "launching"
    error: str = ""
    error_code: str = ""  # the wire code of the error (invalid, not_found, ...), so clients raise its type
    error_field: str | None = None
    progress: float = 0.0
    stage: str = ""
    memory: int = 0
    queue_depth: int = 0
    inflight: int = 0
    stats: p.InstanceStats | None = None


@dataclass
class Model:
    uid: str
    model_name: str
    model_type: str
    model_format: str = ""
    size: int | str | None = None
    quantization: str = ""
    ability: list[str] = field(default_factory=list)
    context_length: int = 0
    replicas: list[Replica] = field(default_factory=list)
    terminating: bool = False
    error: str = ""  # a launch that failed: the model stays failed until terminated
    error_code: str = ""
    error_field: str | None = None

    @property
    def state(self) -> str:
        states = {r.state for r in self.replicas}
        if self.terminating:
            return "terminating"
        if "failed" in states or self.error:
            return "failed"
        if "launching" in states or not states:
            return "launching"
        return "ready" if states == {"ready"} else "launching"


@dataclass
class WorkerState:
    info: p.DeviceInfo
    last_seen: float
    reserved: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.info.free_memory - sum(self.reserved.values())


class LaunchRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the scheduler remembers of a launch across its own restarts (placement and a launch's failure)."""

    uid: str
    model_name: str
    model_type: str
    model_format: str = ""
    size: int | str | None = None
    quantization: str = ""
    replicas: list[tuple[str, int]] = []  # (worker id, replica index)
    error: str = ""
    error_code: str = ""
    error_field: str | None = None


class LaunchBook:
    """<home>/scheduler/launched.json: the launched uids, written atomically at each launch and terminate, so that
    a restarted scheduler never forgets an acknowledged launch: what the workers still hold is `ready` again,
    what no worker holds any more is `failed` with the reason (instead of vanishing)."""

    def __init__(self, home: Path):
        self.path = home / "scheduler" / "launched.json"
        self.lock = threading.Lock()

    def load(self) -> list[LaunchRecord]:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=list[LaunchRecord])
        except FileNotFoundError:
            return []
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("launch_book_unreadable", path=str(self.path), error=str(exc))
            return []

    def save(self, records: list[LaunchRecord]) -> None:
        with self.lock:
            tmp = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-")
                with os.fdopen(fd, "wb") as f:
                    f.write(msgspec.json.encode(records))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                tmp = None
            except OSError as exc:
                raise storage_error("record the launch in", self.path, exc) from None
            finally:
                if tmp is not None:
                    Path(tmp).unlink(missing_ok=True)


class Scheduler:
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
        for record in self.book.load():
            self.models[record.uid] = Model(
                uid=record.uid, model_name=record.model_name, model_type=record.model_type,
                model_format=record.model_format, size=record.size, quantization=record.quantization,
                replicas=[Replica(worker_id=wid, index=index) for wid, index in record.replicas],
                error=record.error, error_code=record.error_code, error_field=record.error_field)

    def _record(self) -> None:
        """Write the launch book from the current models (call without holding self.lock)."""
        with self.lock:
            records = [LaunchRecord(uid=m.uid, model_name=m.model_name, model_type=m.model_type,
                                    model_format=m.model_format, size=m.size, quantization=m.quantization,
                                    replicas=[(r.worker_id, r.index) for r in m.replicas], error=m.error,
                                    error_code=m.error_code, error_field=m.error_field)
                       for m in self.models.values()]
        self.book.save(records)

    def handlers(self) -> dict:
        return {
            p.Ping: lambda msg, ctx: p.Pong(payload=msg.payload),
            p.WorkerReport: self.on_report,
            p.LaunchModel: self.launch,
            p.ListModels: self.list_models,
            p.DescribeModel: self.describe,
            p.TerminateModel: self.terminate,
            p.InstancesOf: self.instances_of,
            p.FindPaths: self.find_paths,
            p.SchedulerStatus: self.status,
        }

    inline = {p.Ping, p.WorkerReport, p.ListModels, p.DescribeModel, p.InstancesOf, p.SchedulerStatus}

    # ------------------------------------------------------------------ workers

    def on_report(self, msg: p.WorkerReport, ctx) -> p.Ok:
        now = time.monotonic()
        wid = msg.device.worker_id
        ctx.require_service(p.worker_service(wid), f"a report for worker {wid!r}")
        with self.lock:
            state = self.workers.get(wid)
            if state is None or state.info.pid != msg.device.pid:
                log.info("worker_joined", worker=wid, device=msg.device.device, free=msg.device.free_memory,
                         restarted=state is not None)
                state = self.workers[wid] = WorkerState(msg.device, now, reserved=state.reserved if state else {})
            state.info, state.last_seen = msg.device, now
            held = set()
            for inst in msg.instances:
                held.add((inst.model_uid, inst.replica))
                state.reserved.pop((inst.model_uid, inst.replica), None)  # the worker counts it now
                model = self.models.get(inst.model_uid)
                if model is None and now - self.terminated.get(inst.model_uid, -1e9) < self.settings.liveness_s:
                    continue  # a report sent before its unload
                if model is None:  # known to the worker, not to us: we restarted; adopt it
                    model = Model(uid=inst.model_uid, model_name=inst.model_name, model_type=inst.model_type,
                                  model_format=inst.model_format, size=inst.model_size_in_billions,
                                  quantization=inst.quantization)
                    self.models[inst.model_uid] = model
                model.ability, model.context_length = inst.model_ability, inst.context_length
                replica = next((r for r in model.replicas if r.index == inst.replica and r.worker_id == wid),
                               None)
                if replica is None:
                    replica = Replica(worker_id=wid, index=inst.replica)
                    model.replicas.append(replica)
                replica.state = inst.state  # the worker's word, whatever we thought before
                replica.error, replica.error_code = inst.error, inst.error_code
                replica.error_field = inst.error_field
                replica.progress, replica.memory, replica.stage = inst.progress, inst.memory, inst.stage
                replica.queue_depth, replica.inflight = inst.queue_depth, inst.inflight
                replica.stats = inst.stats
            for model in self.models.values():
                for r in model.replicas:
                    if (r.worker_id == wid and (model.uid, r.index) not in held and r.state != "failed"
                            and (model.uid, r.index) not in state.reserved and not model.terminating):
                        self._fail(r, f"worker {wid} no longer holds it (the worker restarted or unloaded it)")
        return p.Ok()

    @staticmethod
    def _fail(replica: Replica, why: str, code: str = "unavailable", field: str | None = None) -> None:
        replica.state, replica.error, replica.error_code, replica.error_field = "failed", why, code, field

    def expire_workers(self) -> None:
        while self.running:
            time.sleep(self.settings.heartbeat_interval)
            now = time.monotonic()
            with self.lock:
                for wid, state in list(self.workers.items()):
                    if now - state.last_seen > self.settings.liveness_s:
                        del self.workers[wid]
                        why = f"worker {wid} stopped reporting (nothing for {self.settings.liveness_s:g}s)"
                        for model in self.models.values():
                            for r in model.replicas:
                                if r.worker_id == wid and r.state in ("launching", "ready"):
                                    self._fail(r, why)
                        log.warning("worker_lost", worker=wid)
                if now - self.started > self.settings.liveness_s:  # launches remembered from before a restart
                    for model in self.models.values():
                        for r in model.replicas:
                            if r.worker_id not in self.workers and r.state == "launching" and not model.terminating:
                                self._fail(r, f"worker {r.worker_id} has not reported since the scheduler "
                                              "restarted")

    def status(self, msg, ctx) -> p.SchedulerStatusReply:
        with self.lock:
            return p.SchedulerStatusReply(workers=[w.info for w in self.workers.values()],
                                          instances=len(self.models))

    # ------------------------------------------------------------------ launch

    def _registration(self, model_type: str, model_name: str) -> LLMFamily | EmbeddingFamily:
        reply = self.bus.call(p.REGISTRY, p.GetRegistration(model_type=model_type, model_name=model_name))
        if model_type == "LLM":
            family = parse_llm(reply.definition)
            # Send workers a self-contained definition: the family's prompt style and template resolved.
            return msgspec.structs.replace(family, prompt_style=catalog.resolve_prompt_style(family),
                                           chat_template=catalog.family_chat_template(family))
        return parse_embedding(reply.definition)

    def launch(self, msg: p.LaunchModel, ctx) -> p.Launched:
        if msg.model_type not in ("LLM", "embedding"):
            raise InvalidRequest(f"model_type {msg.model_type!r} must be LLM or embedding", field="model_type")
        if msg.replica < 1:
            raise InvalidRequest(f"replica must be >= 1, got {msg.replica}", field="replica")
        uid = msg.model_uid or msg.model_name
        problem = check_name(uid, "model_uid")
        if problem:
            raise InvalidRequest(problem.message, field="model_uid")
        options = self._engine_options(msg)
        formats = engine_formats(msg.model_engine, msg.model_type)
        if formats is not None and msg.model_format is not None and msg.model_type == "LLM" \
                and msg.model_format not in formats:
            raise InvalidRequest(f"model_engine {msg.model_engine!r} does not run model_format {msg.model_format!r} "
                                 f"(it runs {', '.join(formats)})", field="model_engine")
        family = self._registration(msg.model_type, msg.model_name)
        if isinstance(family, LLMFamily):
            spec, quant = match_spec(family, msg.model_format, msg.model_size_in_billions, msg.quantization,
                                     None if msg.model_type == "embedding" else formats)
            probe = p.ProbeFiles(model_type="LLM", spec=spec, quantization=quant)
            base = p.LoadInstance(model_uid=uid, model_type="LLM", llm=family, spec=spec, quantization=quant,
                                  options=options)
            fmt, size = spec.model_format, spec.model_size_in_billions
            check_engine_options(options, engine_of(fmt, "LLM"))
        else:
            if msg.model_format not in (None, "pytorch") or msg.quantization not in (None, "none"):
                raise InvalidRequest("embedding models take no model_format or quantization", field="model_format")
            probe = p.ProbeFiles(model_type="embedding", embedding=family)
            base = p.LoadInstance(model_uid=uid, model_type="embedding", embedding=family, options=options)
            fmt, size, quant = "pytorch", None, "none"
            check_engine_options(options, "sentence_transformers")
        with self.lock:
            if uid in self.models:
                raise Conflict(f"model uid {uid!r} is already in use ({self.models[uid].state}); terminate it "
                               "or pass another model_uid", field="model_uid")
        # Files first (each worker looks on its own host, and sizes the instance from what it finds), then memory.
        found = self._probe(probe)
        with self.lock:
            if uid in self.models:
                raise Conflict(f"model uid {uid!r} is already in use ({self.models[uid].state}); terminate it "
                               "or pass another model_uid", field="model_uid")
            slots = [Slot(w.info.worker_id, w.info.device, w.free, found[wid].memory,
                          tuple(h for h in (w.info.host, w.info.address) if h),
                          None if found[wid].ok else error_class(found[wid].code or "not_found")(
                              found[wid].problem, found[wid].field))
                     for wid, w in self.workers.items() if wid in found]
            if not slots:
                raise Unavailable("no worker answered (they are restarting, or too busy to answer in 10 s)")
            chosen = place(slots, msg.replica, msg.n_gpu, msg.gpu_idx, msg.devices, msg.worker_ip)
            need = {wid: found[wid].memory for wid in chosen}
            model = Model(uid=uid, model_name=msg.model_name, model_type=msg.model_type, model_format=fmt,
                          size=size, quantization=quant or "",
                          ability=list(family.model_ability) if isinstance(family, LLMFamily) else ["embed"],
                          context_length=(options.n_ctx or family.context_length) if isinstance(family, LLMFamily)
                          else family.max_tokens)
            loads = []
            for index, wid in enumerate(chosen):
                self.workers[wid].reserved[(uid, index)] = need[wid]
                model.replicas.append(Replica(worker_id=wid, index=index, memory=need[wid]))
                loads.append((wid, msgspec.structs.replace(base, replica=index, memory_estimate=need[wid])))
            self.models[uid] = model
        try:
            self._record()  # acknowledged launches survive a scheduler restart
        except ZinferError:
            with self.lock:
                self.models.pop(uid, None)
                for wid in chosen:
                    self.workers[wid].reserved = {k: v for k, v in self.workers[wid].reserved.items() if k[0] != uid}
            raise
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

    def _engine_options(self, msg: p.LaunchModel) -> p.EngineOptions:
        """The launch's engine options, typed (unknown names refused), under the operator's code policy."""
        options = engine_options(msg.engine_kwargs)
        if options.trust_remote_code and msg.model_name not in self.settings.trust_remote_code_models:
            raise Forbidden(f"trust_remote_code: model {msg.model_name!r} may not run its own code here; an "
                            "operator allows it per model with trust_remote_code_models in the settings file",
                            field="trust_remote_code")
        return options

    def _load_all(self, model: Model, loads: list[tuple[str, p.LoadInstance]]) -> None:
        errors: list[ZinferError] = []

        def load_one(wid: str, load: p.LoadInstance, replica: Replica) -> None:
            try:
                self.bus.call(p.worker_service(wid), load, timeout=self.settings.launch_timeout)
            except ZinferError as exc:
                with self.lock:
                    self._fail(replica, exc.message, exc.code, exc.field)
                errors.append(exc)

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
                        r.state, r.progress = "ready", 1.0
                log.info("launched", model_uid=model.uid)
                return
            first = errors[0]
            model.error, model.error_code, model.error_field = first.message, first.code, first.field
        log.error("launch_failed", model_uid=model.uid, error=str(first))
        try:
            self._record()
        except ZinferError as exc:
            log.error("launch_book_write_failed", error=str(exc))
        # Nothing half-loaded: the replicas that did load are unloaded again.
        for wid, _load in loads:
            try:
                self.bus.call(p.worker_service(wid), p.UnloadInstance(model_uid=model.uid), timeout=30)
            except ZinferError:
                pass

    # ------------------------------------------------------------------ views, terminate

    def _view(self, m: Model) -> p.InstanceView:
        hosts = {wid: w.info.host for wid, w in self.workers.items()}
        addresses = {wid: w.info.address or w.info.host for wid, w in self.workers.items()}
        failed = next((r for r in m.replicas if r.state == "failed" and r.error), None)
        error, code, field_ = ((m.error, m.error_code, m.error_field) if m.error else
                               (failed.error, failed.error_code, failed.error_field) if failed else ("", "", None))
        return p.InstanceView(
            model_uid=m.uid, model_name=m.model_name, model_type=m.model_type, model_format=m.model_format,
            model_size_in_billions=m.size, quantization=m.quantization, model_ability=m.ability,
            context_length=m.context_length, replica=len(m.replicas),
            devices=[r.worker_id for r in m.replicas],
            hosts=[hosts.get(r.worker_id, "?") for r in m.replicas],
            address=[f"{addresses.get(r.worker_id, '?')}/{p.worker_service(r.worker_id)}" for r in m.replicas],
            state=m.state, error=error, error_code=code, error_field=field_,
            progress=sum(r.progress for r in m.replicas) / max(1, len(m.replicas)),
            stage=next((r.stage for r in m.replicas if r.state == "launching" and r.stage), ""),
            memory=sum(r.memory for r in m.replicas), queue_depth=sum(r.queue_depth for r in m.replicas),
            inflight=sum(r.inflight for r in m.replicas), stats=_sum_stats(r.stats for r in m.replicas))

    def list_models(self, msg, ctx) -> p.ModelList:
        with self.lock:
            return p.ModelList(models=[self._view(m) for m in self.models.values()])

    def describe(self, msg: p.DescribeModel, ctx) -> p.ModelDescription:
        with self.lock:
            model = self.models.get(msg.model_uid)
            if model is None:
                raise NotFound(f"no launched model has uid {msg.model_uid!r}", field="model_uid")
            return p.ModelDescription(model=self._view(model))

    def instances_of(self, msg: p.InstancesOf, ctx) -> p.UidList:
        with self.lock:
            return p.UidList(model_uids=[m.uid for m in self.models.values()
                                         if m.model_name == msg.model_name and m.model_type == msg.model_type])

    def terminate(self, msg: p.TerminateModel, ctx) -> p.Ok:
        with self.lock:
            model = self.models.get(msg.model_uid)
            if model is None:
                raise NotFound(f"no launched model has uid {msg.model_uid!r}", field="model_uid")
            model.terminating = True
            workers = sorted({r.worker_id for r in model.replicas})
        for wid in workers:
            try:
                self.bus.call(p.worker_service(wid), p.UnloadInstance(model_uid=msg.model_uid), timeout=60)
            except NotFound:
                pass  # never loaded there, or already gone
            except ZinferError as exc:
                if wid in self.workers and exc.code != "unavailable":
                    with self.lock:
                        model.terminating = False
                    raise
        with self.lock:
            self.models.pop(msg.model_uid, None)
            self.terminated[msg.model_uid] = time.monotonic()
            for wid in workers:
                if wid in self.workers:
                    self.workers[wid].reserved = {k: v for k, v in self.workers[wid].reserved.items()
                                                  if k[0] != msg.model_uid}
        self._record()
        log.info("terminated", model_uid=msg.model_uid)
        return p.Ok(message=f"terminated {msg.model_uid}")


def _sum_stats(parts) -> p.InstanceStats:
    total = p.InstanceStats()
    for part in parts:
        if part is not None:
            for name in p.InstanceStats.__struct_fields__:
                setattr(total, name, getattr(total, name) + getattr(part, name))
    return total


def run_scheduler(settings: Settings) -> int:
    scheduler = Scheduler(settings)
    runtime = ServiceRuntime(p.SCHEDULER, settings, scheduler.handlers(), inline=Scheduler.inline)
    scheduler.bus = runtime
    threading.Thread(target=scheduler.expire_workers, name="expire", daemon=True).start()
    runtime.install_signal_handlers()
    runtime.serve()
    scheduler.running = False
    return runtime.exit_code

"""The scheduler's bus handlers: launch (match a spec, probe the workers' files, then place it), load on request,
keep_alive, list, describe, terminate. They run on the service's handler threads, do the slow parts there
(the registry, probes, a terminate's unloads) and hand every change of state to the loop that owns it
(services/scheduler/core.py) as an event, waiting for its answer; reads come from the loop's published snapshot.
"""

from __future__ import annotations

import time

import msgspec
import structlog

from zinfer.services.scheduler import events as ev
from zinfer.services.scheduler.core import Core
from zinfer.services.scheduler.lifecycle import resolve_keep_alive
from zinfer.services.scheduler.placement import (
    choose_embedding,
    launch_loras,
    launch_options,
    match_spec,
    with_path,
    with_projector,
)
from zinfer.shared import durations, engines
from zinfer.shared import protocol as p
from zinfer.shared.config import Settings
from zinfer.shared.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    TooLarge,
    ZinferError,
)
from zinfer.shared.models import (
    MODEL_TYPES,
    RERANK_TYPES_SERVED,
    Definition,
    EmbeddingFamily,
    LLMFamily,
    RerankFamily,
    check_name,
)
from zinfer.shared.transport import ServiceRuntime, handlers_of

log = structlog.get_logger()


class Scheduler:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.core = Core(settings)
        self.bus: ServiceRuntime | None = None  # set by run_scheduler: calls go out as the scheduler

    def handlers(self) -> dict:
        return handlers_of(self, (p.WorkerReport, p.LaunchModel, p.WakeModel, p.KeepAlive, p.ListModels,
                                  p.DescribeModel, p.TerminateModel, p.InstancesOf, p.FindPaths, p.SchedulerStatus,
                                  p.LoadLora, p.UnloadLora))

    # Reports are queued for the loop and reads come from its snapshot: neither waits, so they run inline.
    inline = {p.WorkerReport, p.ListModels, p.DescribeModel, p.InstancesOf, p.SchedulerStatus}

    def worker_report(self, msg: p.WorkerReport, ctx) -> p.Ok:
        ctx.require_service(p.worker_service(msg.device.worker_id), f"a report for worker {msg.device.worker_id!r}")
        self.core.post(ev.Report(msg))
        return p.Ok()

    # ------------------------------------------------------------------ reads

    def list_models(self, msg, ctx) -> p.ModelList:
        return p.ModelList(models=list(self.core.snapshot.views.values()))

    def describe_model(self, msg: p.DescribeModel, ctx) -> p.ModelDescription:
        found = self.core.snapshot.views.get(msg.model_uid)
        if found is None:
            raise NotFound(f"no launched model has uid {msg.model_uid!r}", field="model_uid")
        return p.ModelDescription(model=found)

    def instances_of(self, msg: p.InstancesOf, ctx) -> p.UidList:
        return p.UidList(model_uids=[uid for uid, v in self.core.snapshot.views.items()
                                     if (v.info.model_name, v.info.model_type) == (msg.model_name, msg.model_type)])

    def scheduler_status(self, msg, ctx) -> p.SchedulerStatusReply:
        snapshot = self.core.snapshot
        return p.SchedulerStatusReply(workers=list(snapshot.workers.values()), instances=len(snapshot.views))

    # ------------------------------------------------------------------ launch

    def _registration(self, model_type: str, model_name: str) -> Definition:
        """The definition to launch, typed and complete (the registry resolves its prompt style and template)."""
        reply = self.bus.call(p.REGISTRY, p.GetRegistration(model_type=model_type, model_name=model_name,
                                                            resolved=True))
        family = getattr(reply, model_type.lower())  # llm, embedding, rerank, audio
        if family is None:
            raise InvalidRequest(f"the registry has no launchable {model_type} definition of {model_name!r}",
                                 field="model_name")
        return family

    def launch_model(self, msg: p.LaunchModel, ctx) -> p.Launched:
        if msg.model_type not in MODEL_TYPES:
            raise InvalidRequest(f"model_type {msg.model_type!r} must be one of {', '.join(MODEL_TYPES)}",
                                 field="model_type")
        if msg.replica < 1:
            raise InvalidRequest(f"replica must be >= 1, got {msg.replica}", field="replica")
        uid = msg.model_uid or msg.model_name
        problem = check_name(uid, "model_uid")
        if problem:
            raise InvalidRequest(problem.message, field="model_uid")
        keep_alive = resolve_keep_alive(msg.keep_alive, self.settings.keep_alive)
        probe, base = self._load_of(msg, uid)
        if uid in self.core.snapshot.views:
            raise Conflict(f"model uid {uid!r} is already in use ({self.core.snapshot.views[uid].state}); terminate "
                           "it or pass another model_uid", field="model_uid")
        # Files first (each worker looks on its own host, and sizes the instance from what it finds), then memory.
        workers = list(self.core.snapshot.workers)
        if not workers:
            raise TooLarge("no worker is running", field="n_gpu")
        found = ev.ask_workers(self.bus, workers, probe, 10.0, "probe")
        for reply in found.values() if msg.model_path is not None else ():  # said of the path the caller gave
            if not reply.ok and (reply.field or "").endswith("model_uri"):
                reply.field, reply.problem = "model_path", reply.problem.replace("model_uri", "model_path")
                reply.code = "invalid"  # the caller's path is the request's fault: a 400, not a missing model
        return self.core.ask(ev.Place(launch=msg, base=base, found=found, keep_alive=keep_alive))

    def _load_of(self, msg: p.LaunchModel, uid: str) -> tuple[p.ProbeFiles, p.LoadInstance]:
        """What to ask the workers about the files, and what to load: the registration with the launch's choices."""
        options = launch_options(msg, self.settings.trust_remote_code_models)
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
            engines.check_options(options, engines.for_model("LLM", spec.model_format))
            by_path, loras = msg.model_path is not None, launch_loras(msg)
            options = with_projector(options, family, spec, by_path)
            return (p.ProbeFiles(model_type="LLM", spec=spec, quantization=quant, read_context=by_path, loras=loras,
                                 projector=options.multimodal_projector or ""),
                    p.LoadInstance(model_uid=uid, model_type="LLM", llm=family, spec=spec, quantization=quant,
                                   options=options, incarnation=incarnation, model_path=msg.model_path or "",
                                   loras=loras))
        if launch_loras(msg):
            raise InvalidRequest(f"peft_model_config: LoRA adapters are for LLMs, not {msg.model_type} models",
                                 field="peft_model_config")
        if isinstance(family, EmbeddingFamily):
            family = choose_embedding(family, msg.model_format, msg.quantization, formats)
        elif msg.model_format not in (None, "pytorch") or msg.quantization not in (None, "none"):
            raise InvalidRequest(f"{msg.model_type} models run in model_format pytorch with quantization none",
                                 field="model_format" if msg.model_format not in (None, "pytorch") else "quantization")
        if isinstance(family, RerankFamily) and family.type not in RERANK_TYPES_SERVED:
            raise InvalidRequest(f"type {family.type!r}: zinfer runs rerank models of type normal (on "
                                 "sentence-transformers' CrossEncoder), or unknown when the model turns out normal; "
                                 f"{family.type} rerankers are not supported yet", field="type")
        engines.check_options(options, engines.for_model(msg.model_type, engines.model_format(msg.model_type, family)))
        folder = {msg.model_type: family}
        return (p.ProbeFiles(model_type=msg.model_type, **folder),
                p.LoadInstance(model_uid=uid, model_type=msg.model_type, options=options, incarnation=incarnation,
                               model_path=msg.model_path or "", **folder))

    def find_paths(self, msg: p.FindPaths, ctx) -> p.PathsFound:
        """Which workers' hosts have these paths; the registry checks a model_uri that its own host lacks this
        way. Workers that do not answer in time count as not having them."""
        ctx.require_service(p.REGISTRY, "FindPaths")
        if len(msg.dirs) + len(msg.files) > 256:
            raise InvalidRequest("FindPaths: at most 256 paths", field="files")
        found: dict[str, list[str]] = {}
        hosts: list[str] = []
        for reply in ev.ask_workers(self.bus, list(self.core.snapshot.workers), msg, 5.0, "find_paths").values():
            for path, where in reply.found.items():
                found.setdefault(path, []).extend(h for h in where if h not in found.get(path, []))
            hosts += [h for h in reply.hosts if h not in hosts]
        return p.PathsFound(found=found, hosts=hosts)

    # ------------------------------------------------------------------ load on request, keep_alive

    def wake_model(self, msg: p.WakeModel, ctx) -> p.Launched:
        if msg.model_uid:
            return self.core.ask(ev.Wake(msg.model_uid))
        if not msg.model_name:
            raise InvalidRequest("WakeModel needs a model_uid or a model_name", field="model_uid")
        views = self.core.snapshot.views  # its own uid, else an instance of that registration (a ready one first)
        named = [v for v in views.values() if v.info.model_name == msg.model_name and v.state != "terminating"]
        found = views.get(msg.model_name) or min(named, key=lambda v: v.state != "ready", default=None)
        if found is not None:
            return self.core.ask(ev.Wake(found.model_uid))
        # The options it was last launched with (its format, engine, devices, keep_alive...), under its name. A
        # name that is no registration is a 404 for everyone, before the role decides about loading one.
        launch = self.core.ask(ev.LastLaunch(msg.model_name)) or p.LaunchModel(model_name=msg.model_name,
                                                                        model_type=self._type_of(msg.model_name))
        if ctx.caller.role not in self.settings.load_on_request_roles:
            raise Forbidden(f"model {msg.model_name!r} is not running, and loading a registered model by its name "
                            f"is for the roles {self.settings.load_on_request_roles} (load_on_request_roles), not "
                            f"{ctx.caller.role}", field="model")
        launch = msgspec.structs.replace(launch, model_uid=msg.model_name)  # requests name it so from now on
        log.info("loading_on_request", model_name=msg.model_name, model_uid=launch.model_uid, caller=str(ctx.caller))
        try:
            return self.launch_model(launch, ctx)
        except Conflict:  # another request launched it meanwhile
            return self.core.ask(ev.Wake(launch.model_uid))

    def _type_of(self, model_name: str) -> str:
        for model_type in MODEL_TYPES:
            try:
                self.bus.call(p.REGISTRY, p.GetRegistration(model_type=model_type, model_name=model_name))
                return model_type
            except NotFound:
                continue
        raise NotFound(f"no model is launched as {model_name!r}, and no registration has that name", field="model")

    def keep_alive(self, msg: p.KeepAlive, ctx) -> p.Ok:
        if ctx.caller.role not in self.settings.keep_alive_roles:
            raise Forbidden(f"keep_alive: a request's own keep_alive is for the roles {self.settings.keep_alive_roles} "
                            f"(keep_alive_roles), not {ctx.caller.role}", field="keep_alive")
        seconds = self.core.ask(ev.SetKeepAlive(msg.model_uid, None if msg.keep_alive < 0 else msg.keep_alive))
        return p.Ok(message=f"{msg.model_uid} stays loaded {durations.show(seconds)} once idle")

    # ------------------------------------------------------------------ LoRA adapters at run time

    def load_lora(self, msg: p.LoadLora, ctx) -> p.Ok:
        """Load an adapter into every replica (each checks it against its model); all or none: a replica that
        refuses it has it unloaded from those that took it. Then the launch remembers it."""
        targets, _loras = self._lora_targets(msg.model_uid, ctx, "LoadLora")
        done = []
        try:
            for wid, index in targets:
                self.bus.call(p.instance_service(wid, msg.model_uid, index), msg, timeout=self.settings.launch_timeout)
                done.append((wid, index))
        except ZinferError:
            undo = p.UnloadLora(model_uid=msg.model_uid, lora_name=msg.lora.lora_name)
            for wid, index in done:
                try:
                    self.bus.call(p.instance_service(wid, msg.model_uid, index), undo, timeout=30)
                except ZinferError:
                    pass  # its next restart comes back without it: the launch never recorded it
            raise
        self.core.ask(ev.Adapters(msg.model_uid, add=msg.lora))
        log.info("lora_loaded", model_uid=msg.model_uid, lora_name=msg.lora.lora_name, caller=str(ctx.caller))
        return p.Ok(message=f"loaded LoRA adapter {msg.lora.lora_name!r} into {msg.model_uid} ({len(done)} "
                            f"replica{'s' if len(done) != 1 else ''})")

    def unload_lora(self, msg: p.UnloadLora, ctx) -> p.Ok:
        targets, loras = self._lora_targets(msg.model_uid, ctx, "UnloadLora")
        if msg.lora_name not in [x.lora_name for x in loras]:
            raise NotFound(f"model {msg.model_uid!r} has no LoRA adapter named {msg.lora_name!r} (loaded: "
                           f"{', '.join(x.lora_name for x in loras) or 'none'})", field="lora_name")
        self.core.ask(ev.Adapters(msg.model_uid, drop=msg.lora_name))  # first: a restart from now on lacks it
        for wid, index in targets:
            try:
                self.bus.call(p.instance_service(wid, msg.model_uid, index), msg, timeout=60)
            except NotFound:
                pass  # a replica that came back without it already
        log.info("lora_unloaded", model_uid=msg.model_uid, lora_name=msg.lora_name, caller=str(ctx.caller))
        return p.Ok(message=f"unloaded LoRA adapter {msg.lora_name!r} from {msg.model_uid}")

    def _lora_targets(self, uid: str, ctx, what: str) -> tuple[list[tuple[str, int]], list]:
        """(each replica's (worker, index), the launch's adapters) of a ready LLM, for an admin's call."""
        if ctx.caller.role != p.ADMIN:
            raise Forbidden(f"{what} is for admin keys, not {ctx.caller.role}", field="model_uid")
        return self.core.ask(ev.Adapters(uid))

    # ------------------------------------------------------------------ terminate

    def terminate_model(self, msg: p.TerminateModel, ctx) -> p.Ok:
        incarnation, holding, running = self.core.ask(ev.Terminate(msg.model_uid))
        unload = p.UnloadInstance(model_uid=msg.model_uid, incarnation=incarnation)
        error = None
        for wid in holding:
            try:
                self.bus.call(p.worker_service(wid), unload, timeout=60 + self.settings.terminate_grace_s)
            except NotFound:
                pass  # never loaded there, or already gone
            except ZinferError as exc:
                if wid in running and exc.code not in ("unavailable", "no_route"):
                    error = exc
                    break
        self.core.ask(ev.Terminated(msg.model_uid, incarnation, error))
        if error is not None:
            raise error
        return p.Ok(message=f"terminated {msg.model_uid}")


def run_scheduler(settings: Settings) -> int:
    scheduler = Scheduler(settings)
    runtime = ServiceRuntime(p.SCHEDULER, settings, scheduler.handlers(), inline=Scheduler.inline)
    scheduler.bus = runtime
    scheduler.core.effects = ev.Effects(runtime, scheduler.core.post)
    scheduler.core.start()
    runtime.install_signal_handlers()
    runtime.serve()
    scheduler.core.running = False
    return runtime.exit_code

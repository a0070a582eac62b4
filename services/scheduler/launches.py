"""The loop's side of launches, loads on request, idle unloads, keep_alive and terminates. `Launches` keeps no
state of its own: it acts on the Core it belongs to, and only ever runs on that Core's loop thread."""

from __future__ import annotations

import time

import msgspec
import structlog

from zinfer.services.scheduler import events as ev
from zinfer.services.scheduler.book import Model, Pins, Replica, release
from zinfer.services.scheduler.lifecycle import expired, room_on
from zinfer.services.scheduler.machine import Event, Phase
from zinfer.services.scheduler.placement import place, slots_of
from zinfer.shared import durations, instances
from zinfer.shared import protocol as p
from zinfer.shared.errors import Conflict, InstanceNotReady, InvalidRequest, NotFound, Unavailable, ZinferError

log = structlog.get_logger()


class Launches:
    def __init__(self, core):
        self.core = core

    def dispatch(self) -> dict:
        return {ev.Place: self.place, ev.Wake: self.wake, ev.SetKeepAlive: self.set_keep_alive,
                ev.Adapters: self.adapters, ev.Terminate: self.terminate, ev.Terminated: self.terminated,
                ev.LastLaunch: lambda e: self.core.last_launch.get(e.model_name)}

    def replica(self, uid: str, incarnation: int, index: int) -> tuple[Model | None, Replica | None]:
        """The replica an outcome is about, if its launch is still the current one."""
        model = self.core.models.get(uid)
        if model is None or model.incarnation != incarnation:
            return None, None
        return model, next((r for r in model.replicas if r.index == index), None)

    # ------------------------------------------------------------------ launch

    def place(self, e: ev.Place) -> p.Launched:
        """Place a probed launch, reserve its memory, make room under the cap, record it, and send its loads."""
        core, msg, base = self.core, e.launch, e.base
        uid = base.model_uid
        if uid in core.models:
            raise Conflict(f"model uid {uid!r} is already in use ({core.models[uid].state}); terminate it or pass "
                           "another model_uid", field="model_uid")
        slots = slots_of(core.workers, e.found)
        if not slots:
            raise Unavailable("no worker answered (they are restarting, or too busy to answer in 10 s)")
        chosen = place(slots, msg.replica, msg.n_gpu, msg.gpu_idx, msg.devices, msg.worker_ip)
        need = {wid: e.found[wid].memory for wid in chosen}
        if base.llm is not None and e.found[chosen[0]].context_length:  # by path: the files' context length
            base = msgspec.structs.replace(base, llm=msgspec.structs.replace(
                base.llm, context_length=e.found[chosen[0]].context_length))
        victims = self.room(chosen, uid)  # raises when there is none, before anything changed
        model = Model(uid=uid, info=instances.info_of(base), incarnation=base.incarnation,
                      pins=Pins(n_gpu=msg.n_gpu, gpu_idx=msg.gpu_idx, devices=msg.devices, worker_ip=msg.worker_ip),
                      keep_alive=e.keep_alive, restore=msg.restore, last_active=time.time())
        for index, wid in enumerate(chosen):
            core.workers[wid].reserved[(uid, index)] = need[wid]
            model.replicas.append(Replica(worker_id=wid, index=index, phase=Phase.LAUNCHING,
                                          load=msgspec.structs.replace(base, replica=index, memory_estimate=need[wid]),
                                          status=instances.ReplicaStatus(memory=need[wid])))
        core.models[uid] = model
        for victim, why in victims:
            self.mark_unloaded(victim, why, Event.UNLOAD)
        try:
            core.record()  # acknowledged launches survive a scheduler restart
        except ZinferError:
            del core.models[uid]
            release(core.workers, chosen, uid)
            raise
        core.last_launch.put(msg)
        for victim, _why in victims:
            self.send_unloads(victim)
        log.info("launching", model_uid=uid, workers=chosen, need=need)
        for r in model.replicas:
            self.send_load(model, r)
        return p.Launched(model_uid=uid)

    def room(self, workers: list[str], coming: str) -> list[tuple[Model, str]]:
        """Loading `coming` on these workers: the least recently used idle instance to unload on each worker
        whose cap is reached (Unavailable when every one there has work)."""
        cap, victims = self.core.settings.max_loaded_per_device, []
        for wid in dict.fromkeys(workers):
            victim = room_on(wid, list(self.core.models.values()), cap, coming)
            if victim is not None and all(victim is not v for v, _ in victims):
                victims.append((victim, f"made room on {wid} for {coming} (max_loaded_per_device {cap}; least "
                                        "recently used)"))
        return victims

    def send_load(self, model: Model, r: Replica, restore_cause: str = "") -> None:
        """Send the replica's LoadInstance to its worker; its outcome comes back as a Loaded of this attempt."""
        r.attempt += 1
        uid, incarnation, index, attempt = model.uid, model.incarnation, r.index, r.attempt
        if r.worker_id not in self.core.workers:
            self.core.post(ev.Loaded(uid, incarnation, index,
                                     Unavailable(f"worker {r.worker_id}, which held it, is not running"), attempt))
            return
        self.core.effects.call(r.worker_id, msgspec.structs.replace(r.load, restore_cause=restore_cause),
                               self.core.settings.launch_timeout,
                               lambda error: ev.Loaded(uid, incarnation, index, error, attempt))

    def on_loaded(self, e: ev.Loaded) -> None:
        model, r = self.replica(e.uid, e.incarnation, e.index)
        if r is not None and e.attempt == r.attempt:  # else: the answer to a load given up on
            self.outcome(model, r, e.error)

    def outcome(self, model: Model, r: Replica, error: ZinferError | None) -> None:
        """A load's outcome (its reply, or its worker's report that it is ready)."""
        if r.phase not in (Phase.LAUNCHING, Phase.WAKING, Phase.RESTORING):
            return  # terminated meanwhile
        r.attempt += 1  # answered: a later reply to the same load is stale
        if r.phase is Phase.RESTORING:
            self.core.restored(model, r, error)
            return
        waking = r.phase is Phase.WAKING
        if r.worker_id in self.core.workers:
            self.core.workers[r.worker_id].reserved.pop((model.uid, r.index), None)
        if error is not None:
            r.fail(error.message, error.code, error.field)
        else:
            r.move(Event.LOADED)
            if r.state == "launching":
                r.status.state, r.status.progress = "ready", 1.0
        if not any(x.phase is (Phase.WAKING if waking else Phase.LAUNCHING) for x in model.replicas):
            self._settled(model, waking)

    def _settled(self, model: Model, waking: bool) -> None:
        """Every replica of a launch (or a load on request) has answered: ready, or nothing half-loaded."""
        error = next((r.status.error for r in model.replicas if r.phase is Phase.FAILED), None)
        if error is None:
            model.last_active = time.time()  # keep_alive counts from when it is ready
            log.info("woken" if waking else "launched", model_uid=model.uid)
            if waking:
                model.woken_at = model.last_active
                self.core.record_quietly()
            return
        model.error = error
        log.error("wake_failed" if waking else "launch_failed", model_uid=model.uid, error=error.message)
        if waking:  # every waiter sees the typed error; the next request tries again
            self.mark_unloaded(model, f"loading on request failed: {error.message}", Event.WAKE_FAILED)
        else:
            for r in model.replicas:
                if r.phase is not Phase.FAILED:
                    r.fail(f"another replica of this launch failed: {error.message}", error.code, error.field)
        self.core.record_quietly()
        self.send_unloads(model)  # this launch's only: a relaunch of the uid is another incarnation

    # ------------------------------------------------------------------ unload, wake, keep_alive

    def expire_idle(self) -> None:
        """Unload each instance idle for its keep_alive."""
        now = time.time()
        for model in [m for m in self.core.models.values() if not m.terminating and not m.error and expired(m, now)]:
            self.unload(model, f"idle for {durations.show(model.keep_alive)} (keep_alive)")

    def unload(self, model: Model, why: str) -> None:
        """Free an instance's memory and keep it launched, `idle-unloaded` from now."""
        if any(r.phase is not Phase.READY for r in model.replicas):
            return
        self.mark_unloaded(model, why, Event.UNLOAD)
        self.send_unloads(model)
        self.core.record_quietly()

    def mark_unloaded(self, model: Model, why: str, event: Event) -> None:
        """The desired state becomes `idle-unloaded`."""
        model.last_active = model.active_at()
        model.unloaded_at = time.time()
        for r in model.replicas:
            r.move(event)
            r.status = instances.ReplicaStatus(state="idle-unloaded", cause=why, stats=r.status.stats,
                                               restarts=r.status.restarts, last_active=r.status.last_active)
        log.info("instance_unloaded", model_uid=model.uid, why=why)

    def send_unloads(self, model: Model) -> None:
        unload = p.UnloadInstance(model_uid=model.uid, incarnation=model.incarnation)
        for wid in sorted({r.worker_id for r in model.replicas}):
            self.core.effects.call(wid, unload, 60 + self.core.settings.terminate_grace_s)

    def wake(self, e: ev.Wake) -> p.Launched:
        """Load an idle-unloaded instance where it was; concurrent wakes find it loading and share that load."""
        model = self.core.models.get(e.uid)
        if model is None:
            raise NotFound(f"no launched model has uid {e.uid!r}", field="model_uid")
        if not model.unloaded:
            return p.Launched(model_uid=e.uid)
        for victim, why in self.room([r.worker_id for r in model.replicas], e.uid):
            self.unload(victim, why)
        model.error, model.unloaded_at, model.last_active = None, 0.0, time.time()
        model.loads += 1
        for r in model.replicas:
            r.move(Event.WAKE)
            r.status = instances.ReplicaStatus(state="launching", stage="loading on request", stats=r.status.stats,
                                               restarts=r.status.restarts)
        log.info("waking", model_uid=e.uid, workers=sorted({r.worker_id for r in model.replicas}))
        for r in model.replicas:
            self.send_load(model, r)
        return p.Launched(model_uid=e.uid)

    def set_keep_alive(self, e: ev.SetKeepAlive) -> float | None:
        model = self.core.models.get(e.uid)
        if model is None:
            raise NotFound(f"no launched model has uid {e.uid!r}", field="model")
        model.keep_alive, model.last_active = e.seconds, time.time()
        self.core.record_quietly()
        return model.keep_alive

    def adapters(self, e: ev.Adapters):
        model = self.core.models.get(e.uid)
        if model is None:
            raise NotFound(f"no launched model has uid {e.uid!r}", field="model_uid")
        loras = list(next((r.load.loras for r in model.replicas if r.load is not None), model.info.loras))
        if e.add is None and e.drop is None:
            if model.info.model_type != "LLM":
                raise InvalidRequest(f"model {e.uid!r} is a {model.info.model_type} model: LoRA adapters are for "
                                     "LLMs", field="model_uid")
            if model.state != "ready":
                raise InstanceNotReady(f"model {e.uid!r} is {model.state}: adapters load into a ready instance",
                                       field="model_uid")
            return [(r.worker_id, r.index) for r in model.replicas], loras
        loras = [x for x in loras if x.lora_name not in (e.drop, e.add and e.add.lora_name)]
        loras += [e.add] if e.add is not None else []
        model.info = msgspec.structs.replace(model.info, loras=loras)
        for r in model.replicas:
            if r.load is not None:
                r.load = msgspec.structs.replace(r.load, loras=loras)
        self.core.record_quietly()
        return None

    # ------------------------------------------------------------------ terminate

    def terminate(self, e: ev.Terminate) -> tuple[int, list[str], set[str]]:
        model = self.core.models.get(e.uid)
        if model is None:
            raise NotFound(f"no launched model has uid {e.uid!r}", field="model_uid")
        for r in model.replicas:
            r.move(Event.TERMINATE)
        return model.incarnation, sorted({r.worker_id for r in model.replicas}), set(self.core.workers)

    def terminated(self, e: ev.Terminated) -> None:
        core = self.core
        model = core.models.get(e.uid)
        if model is None or model.incarnation != e.incarnation:
            return
        if e.error is not None:  # a worker refused: it stays, as it was
            for r in model.replicas:
                r.move(Event.TERMINATE_FAILED)
            return
        del core.models[e.uid]
        core.terminated[e.uid] = core.clock()
        release(core.workers, {r.worker_id for r in model.replicas}, e.uid)
        core.record()
        log.info("terminated", model_uid=e.uid)

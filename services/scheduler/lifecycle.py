"""Model lifecycle in the scheduler: keep_alive (an idle instance is unloaded, its memory freed, and stays
launched as `idle-unloaded`), load on request (an unloaded instance by any request to it; a registration with no
instance by its name, for the roles a setting names, with its last launch's options), the cap on loaded instances
per device (the least recently used idle one makes room), and what the mesh restores when it starts.

The choices are pure functions (`expired`, `room_on`), unit-tested without a mesh; `Lifecycle` is the part of the
Scheduler that acts on them (services/scheduler/service.py mixes it in).
"""

from __future__ import annotations

import threading
import time

import msgspec
import structlog

from zinfer.services.scheduler.book import Model, Replica, release
from zinfer.shared import durations, instances
from zinfer.shared import protocol as p
from zinfer.shared.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unavailable, ZinferError
from zinfer.shared.models import MODEL_TYPES

log = structlog.get_logger()


def expired(model: Model, now: float) -> bool:
    """Loaded, ready, idle, and idle for its keep_alive (wall-clock seconds `now`)."""
    deadline = model.expires_at()
    return deadline is not None and not model.waking and model.idle and now >= deadline


def room_on(worker_id: str, models: list[Model], cap: int, coming: str) -> Model | None:
    """Loading `coming` on this worker: None when the cap (0: none) leaves room; else the least recently used
    idle loaded instance there, to unload. Unavailable when every one there has work (none is unloaded then)."""
    if cap <= 0:
        return None
    loaded = [m for m in models if m.uid != coming and not m.unloaded and not m.terminating and not m.error
              and any(r.worker_id == worker_id for r in m.replicas)]
    if len(loaded) < cap:
        return None
    idle = [m for m in loaded if m.idle and not m.waking and m.state == "ready"]
    if not idle:
        raise Unavailable(f"worker {worker_id} holds {len(loaded)} loaded instances (max_loaded_per_device {cap}) "
                          f"and every one has work or is loading: {', '.join(sorted(m.uid for m in loaded))}; "
                          "try again when one is idle")
    return min(idle, key=Model.active_at)


class Lifecycle:
    """Scheduler methods for the lifecycle (they use its lock, models, workers, bus and book)."""

    def resolve_keep_alive(self, keep_alive: float | None) -> float | None:
        """A launch's keep_alive (None: the setting's), as the book keeps it: seconds, or None for ever."""
        if keep_alive is None:
            return durations.parse(self.settings.keep_alive, "keep_alive")
        return None if keep_alive < 0 else keep_alive

    # ------------------------------------------------------------------ unloading

    def expire_idle(self) -> None:
        """Unload each instance idle for its keep_alive (called every heartbeat interval)."""
        now = time.time()
        with self.lock:
            due = [m for m in self.models.values() if not m.terminating and not m.error and expired(m, now)]
        for model in due:
            self.unload(model, f"idle for {durations.show(model.keep_alive)} (keep_alive)")

    def unload(self, model: Model, why: str) -> None:
        """Free an instance's memory and keep it launched, `idle-unloaded` from now."""
        with self.lock:
            if model.unloaded or model.terminating or self.models.get(model.uid) is not model:
                return
            self._mark_unloaded(model, why)
            workers = sorted({r.worker_id for r in model.replicas})
        unload = p.UnloadInstance(model_uid=model.uid, incarnation=model.incarnation)
        for wid in workers:
            try:
                self.bus.call(p.worker_service(wid), unload, timeout=60 + self.settings.terminate_grace_s)
            except ZinferError as exc:  # gone with its worker, or never held there: nothing to free
                log.info("unload_skipped", model_uid=model.uid, worker=wid, error=str(exc))
        self._record_quietly()

    def _mark_unloaded(self, model: Model, why: str) -> None:
        """(With self.lock held.) The desired state becomes `idle-unloaded`."""
        model.last_active = model.active_at()
        model.unloaded_at = time.time()
        for r in model.replicas:
            r.needs_load = False
            r.status = instances.ReplicaStatus(state="idle-unloaded", cause=why, stats=r.status.stats,
                                               restarts=r.status.restarts, last_active=r.status.last_active)
        log.info("instance_unloaded", model_uid=model.uid, why=why)

    def lost_from_book(self, model: Model, r: Replica, why: str) -> None:
        """(With self.lock held.) A replica no worker holds: loaded again, unless the model came from the launch
        book at start and is not to be restored (its launch said restore=False, or the restore setting is off):
        then it comes back idle-unloaded."""
        if model.from_book and (not model.restore or not self.settings.restore):
            self._mark_unloaded(model, "not restored when the mesh started (restore is off); loads on its first "
                                       "request")
            return
        r.restart(why)

    def _record_quietly(self) -> None:
        try:
            self._record()
        except ZinferError as exc:
            log.error("launch_book_write_failed", error=str(exc))

    def make_room(self, worker_id: str, coming: str) -> None:
        """Loading `coming` on this worker: unload the LRU idle instance there if the cap is reached."""
        with self.lock:
            victim = room_on(worker_id, list(self.models.values()), self.settings.max_loaded_per_device, coming)
        if victim is not None:
            self.unload(victim, f"made room on {worker_id} for {coming} (max_loaded_per_device "
                                f"{self.settings.max_loaded_per_device}; least recently used)")

    def make_room_for_launch(self, uid: str, chosen: list[str]) -> None:
        """A launch placed on these workers: room under the cap on each, else the launch is undone (raises)."""
        try:
            for wid in dict.fromkeys(chosen):
                self.make_room(wid, uid)
        except ZinferError:
            with self.lock:
                self.models.pop(uid, None)
                release(self.workers, chosen, uid)
            self._record_quietly()
            raise

    # ------------------------------------------------------------------ load on request

    def wake(self, msg: p.WakeModel, ctx) -> p.Launched:
        if msg.model_uid:
            return self._wake_uid(msg.model_uid)
        if not msg.model_name:
            raise InvalidRequest("WakeModel needs a model_uid or a model_name", field="model_uid")
        with self.lock:  # its own uid, else an instance of that registration (a ready one first)
            named = [m for m in self.models.values() if m.info.model_name == msg.model_name and not m.terminating]
            model = self.models.get(msg.model_name) or min(named, key=lambda m: m.state != "ready", default=None)
        if model is not None:
            return self._wake_uid(model.uid)
        # The options it was last launched with (its format, engine, devices, keep_alive...), under its name. A
        # name that is no registration is a 404 for everyone, before the role decides about loading one.
        launch = self.last_launch.get(msg.model_name) or p.LaunchModel(model_name=msg.model_name,
                                                                        model_type=self._type_of(msg.model_name))
        if ctx.caller.role not in self.settings.load_on_request_roles:
            raise Forbidden(f"model {msg.model_name!r} is not running, and loading a registered model by its name "
                            f"is for the roles {self.settings.load_on_request_roles} (load_on_request_roles), not "
                            f"{ctx.caller.role}", field="model")
        launch = msgspec.structs.replace(launch, model_uid=msg.model_name)  # requests name it so from now on
        log.info("loading_on_request", model_name=msg.model_name, model_uid=launch.model_uid, caller=str(ctx.caller))
        try:
            return self.launch(launch, ctx)
        except ZinferError as exc:
            if isinstance(exc, Conflict) and launch.model_uid in self.models:
                return self._wake_uid(launch.model_uid)  # another request launched it meanwhile
            raise

    def _type_of(self, model_name: str) -> str:
        for model_type in MODEL_TYPES:
            try:
                self.bus.call(p.REGISTRY, p.GetRegistration(model_type=model_type, model_name=model_name))
                return model_type
            except NotFound:
                continue
        raise NotFound(f"no model is launched as {model_name!r}, and no registration has that name", field="model")

    def _wake_uid(self, uid: str) -> p.Launched:
        """Load an idle-unloaded instance where it was; concurrent wakes find it loading and share that load."""
        with self.lock:
            model = self.models.get(uid)
            if model is None:
                raise NotFound(f"no launched model has uid {uid!r}", field="model_uid")
            if not model.unloaded or model.waking or model.terminating:
                return p.Launched(model_uid=uid)
            workers = sorted({r.worker_id for r in model.replicas})
        for wid in workers:
            self.make_room(wid, uid)
        with self.lock:
            if not model.unloaded or model.waking:
                return p.Launched(model_uid=uid)
            model.waking, model.error = True, None
            model.unloaded_at, model.last_active = 0.0, time.time()
            model.loads += 1
            replicas = list(model.replicas)
            for r in replicas:
                r.status = instances.ReplicaStatus(state="launching", stage="loading on request",
                                                   stats=r.status.stats, restarts=r.status.restarts)
                r.loading = True
        log.info("waking", model_uid=uid, workers=workers)
        threading.Thread(target=self._wake_all, args=(model, replicas), daemon=True).start()
        return p.Launched(model_uid=uid)

    def _wake_all(self, model: Model, replicas: list[Replica]) -> None:
        errors: list[ZinferError] = []

        def one(r: Replica) -> None:
            load = msgspec.structs.replace(r.load, restore_cause="")
            try:
                if r.worker_id not in self.workers:
                    raise Unavailable(f"worker {r.worker_id}, which held it, is not running")
                self.bus.call(p.worker_service(r.worker_id), load, timeout=self.settings.launch_timeout)
            except ZinferError as exc:
                errors.append(exc)
            finally:
                with self.lock:  # the reconciler reads it under the lock
                    r.loading = False

        threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with self.lock:
            model.waking = False
            if errors:  # every waiter sees the typed error; the next request tries again
                model.launch_failed(errors[0])
                self._mark_unloaded(model, f"loading on request failed: {errors[0].message}")
            else:
                for r in replicas:
                    if r.state == "launching":
                        r.status.state, r.status.progress = "ready", 1.0
                model.last_active = time.time()  # keep_alive counts from when it is ready
        if errors:
            log.error("wake_failed", model_uid=model.uid, error=str(errors[0]))
            for r in replicas:  # nothing half-loaded
                try:
                    self.bus.call(p.worker_service(r.worker_id), p.UnloadInstance(
                        model_uid=model.uid, incarnation=model.incarnation), timeout=30)
                except ZinferError:
                    pass
        else:
            log.info("woken", model_uid=model.uid)
        self._record_quietly()

    def keep_alive(self, msg: p.KeepAlive, ctx) -> p.Ok:
        if ctx.caller.role not in self.settings.keep_alive_roles:
            raise Forbidden(f"keep_alive: a request's own keep_alive is for the roles {self.settings.keep_alive_roles} "
                            f"(keep_alive_roles), not {ctx.caller.role}", field="keep_alive")
        with self.lock:
            model = self.models.get(msg.model_uid)
            if model is None:
                raise NotFound(f"no launched model has uid {msg.model_uid!r}", field="model")
            model.keep_alive = None if msg.keep_alive < 0 else msg.keep_alive
            model.last_active = time.time()
        self._record_quietly()
        return p.Ok(message=f"{msg.model_uid} stays loaded {durations.show(model.keep_alive)} once idle")

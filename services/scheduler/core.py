"""The scheduler's state and the one thread that owns it, as vLLM's engine core owns its requests.

Handlers (services/scheduler/service.py), worker reports, the heartbeat timer and the outcomes of calls to workers
arrive as events (services/scheduler/events.py) on one queue; `Core.run` takes them in order and is the only code
that reads or writes models, replicas, workers and the launch book. A replica's life is the state machine of
services/scheduler/machine.py. Slow work (loads, unloads, probes) goes to `Effects` and comes back as an event;
readers use `Core.snapshot`, the views published after each batch of events.

What was launched (each replica's LoadInstance, its worker, the launch's incarnation and placement pins) is the
desired state, written to <home>/scheduler/launched.json at each launch, move, unload and terminate, so it
survives a scheduler restart. Workers are the source of truth for what is loaded: each reports its device and
instances every heartbeat interval, and a replica the worker holds takes the state the worker gives it. A replica
that its worker does not hold (the worker restarted) is LOST and loaded there again; a worker silent for the
liveness period has its replicas LOST until it returns, and after `worker_return_s` they move to another worker
that can hold them. Reports about an older launch of a uid (another incarnation) never touch the current one:
such leftovers are unloaded.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import msgspec
import structlog

from zinfer.services.scheduler import events as ev
from zinfer.services.scheduler.book import LastLaunches, LaunchBook, LaunchRecord, Model, Replica, WorkerState, view
from zinfer.services.scheduler.launches import Launches
from zinfer.services.scheduler.machine import Event, Phase
from zinfer.services.scheduler.placement import place, slots_of
from zinfer.shared import instances
from zinfer.shared import protocol as p
from zinfer.shared.config import Settings
from zinfer.shared.errors import Cancelled, InternalError, RequestTimeout, Unavailable, ZinferError

log = structlog.get_logger()

RETRYABLE = (Unavailable, RequestTimeout, Cancelled)  # a worker that could not load it now: again later
LOADS = (Phase.LAUNCHING, Phase.WAKING, Phase.RESTORING)  # a LoadInstance is on its way


@dataclass(frozen=True)
class Snapshot:
    """What readers see: views of the launched models and the workers, published by the loop (never mutated)."""

    views: dict[str, instances.InstanceView] = field(default_factory=dict)
    workers: dict[str, instances.DeviceInfo] = field(default_factory=dict)


class Core:
    def __init__(self, settings: Settings, effects=None, book: LaunchBook | None = None):
        self.settings = settings
        self.effects = effects  # set before start() when the bus is known
        self.book = book or LaunchBook(settings.home_path)
        self.last_launch = LastLaunches(settings.home_path)  # each name's last launch: what loads it by name
        self.workers: dict[str, WorkerState] = {}
        self.models: dict[str, Model] = {}
        self.terminated: dict[str, float] = {}  # uid -> when: a report sent before its unload must not adopt it
        self.clock = time.monotonic
        self.started = self.clock()
        self.queue: queue.SimpleQueue[ev.Ev] = queue.SimpleQueue()
        self.owner: int | None = None
        self.running = True
        self.launches = Launches(self)
        self.dispatch = {ev.Report: self.on_report, ev.Tick: self.on_tick, ev.Loaded: self.launches.on_loaded,
                         ev.Probed: self.on_probed, ev.Sync: lambda e: None, **self.launches.dispatch()}
        for record in self.book.load():
            self.models[record.uid] = record.model()
        self.snapshot = Snapshot()
        self._publish()

    # ------------------------------------------------------------------ the loop

    def post(self, event: ev.Ev) -> None:
        """From any thread: queue an event for the loop."""
        self.queue.put(event)

    def ask(self, event: ev.Ev, timeout: float = 120.0):
        """From a handler thread: post an event and wait for the loop's answer (its exception raised here). The
        loop answers in milliseconds; no answer in `timeout` is a bug, said as one rather than a hang."""
        event.reply = Future()
        self.post(event)
        try:
            return event.reply.result(timeout)
        except FutureTimeout:
            raise InternalError(f"the scheduler's loop did not answer {type(event).__name__} in {timeout:g} s") \
                from None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="scheduler-loop", daemon=True)
        thread.start()
        return thread

    def run(self) -> None:
        self.owner = threading.get_ident()
        next_tick = self.clock() + self.settings.heartbeat_interval
        while self.running:
            try:
                batch = [self.queue.get(timeout=max(0.0, next_tick - self.clock()))]
            except queue.Empty:
                batch = []
            while 0 < len(batch) < 256:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if self.clock() >= next_tick:  # due even while events keep coming
                next_tick = self.clock() + self.settings.heartbeat_interval
                batch.append(ev.Tick())
            answers = [(event, *self._handle(event)) for event in batch]
            try:
                self._publish()
            except Exception:  # a bug: the last views stay; never the end of the loop
                log.exception("scheduler_publish_failed")
            for event, result, error in answers:  # after the views: a caller's next read sees its own change
                if event.reply is not None:
                    if error is None:
                        event.reply.set_result(result)
                    else:
                        event.reply.set_exception(error)

    def _handle(self, event: ev.Ev) -> tuple[object, BaseException | None]:
        try:
            return self.dispatch[type(event)](event), None
        except ZinferError as exc:
            return None, exc
        except Exception as exc:  # a bug: logged, answered, and never the end of the loop
            log.exception("scheduler_event_failed", event=type(event).__name__)
            return None, exc

    def _publish(self) -> None:
        self.snapshot = Snapshot(views={uid: view(m, self.workers) for uid, m in self.models.items()},
                                 workers={wid: w.info for wid, w in self.workers.items()})

    def record(self) -> None:
        """Write the launch book from the current models (the loop is its only writer, so writes land in order)."""
        self.book.save([LaunchRecord.of(m) for m in self.models.values()])

    def record_quietly(self) -> None:
        try:
            self.record()
        except ZinferError as exc:
            log.error("launch_book_write_failed", error=str(exc))

    # ------------------------------------------------------------------ workers

    def on_report(self, event: ev.Report) -> None:
        msg, now = event.msg, self.clock()
        wid = msg.device.worker_id
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
            if self._held(wid, inst, now):
                held.add((inst.model_uid, inst.replica))
        for model in self.models.values():
            if model.terminating or model.error or model.unloaded:
                continue
            for r in model.replicas:
                key = (model.uid, r.index)
                if restarted and r.worker_id == wid and key not in held and r.phase in LOADS:
                    state.reserved.pop(key, None)  # its load died with the worker's old process
                    r.restart(f"worker {wid} restarted while loading it", Event.LOAD_LOST)
                elif (r.worker_id == wid and key not in held and r.phase in (Phase.READY, Phase.RECORDED)
                        and key not in state.reserved):
                    why = f"worker {wid} restarted" if restarted or r.state in ("ready", "launching") \
                        else r.status.cause or f"worker {wid} does not hold it"
                    self.lost(model, r, why, Event.MISSING)
        self.reconcile()

    def _held(self, wid: str, inst: instances.InstanceReport, now: float) -> bool:
        """One instance a worker holds: the replica takes the worker's word; a leftover is unloaded (False)."""
        model = self.models.get(inst.model_uid)
        if model is None and now - self.terminated.get(inst.model_uid, -1e9) < self.settings.liveness_s:
            return False  # a report sent before its unload
        if model is None:  # known to the worker, not to us (our launch book was lost): adopt it
            model = self.models[inst.model_uid] = Model(uid=inst.model_uid, info=inst.info,
                                                        incarnation=inst.incarnation)
        replica = next((r for r in model.replicas if r.index == inst.replica), None)
        if (inst.incarnation != model.incarnation or model.terminating or model.unloaded or model.error
                or (replica is not None and replica.worker_id != wid)):
            # An older launch of this uid, or a replica that has moved on: never the current one.
            log.info("unloading_stale_instance", worker=wid, model_uid=inst.model_uid, incarnation=inst.incarnation)
            self.effects.call(wid, p.UnloadInstance(model_uid=inst.model_uid, incarnation=inst.incarnation,
                                                    replica=inst.replica), 60)
            return False
        model.info = inst.info
        if replica is None:
            replica = Replica(worker_id=wid, index=inst.replica, phase=Phase.READY)
            model.replicas.append(replica)
        status = inst.status  # the worker's word, whatever we thought before (but an earlier cause)
        if not status.cause:
            status.cause = replica.status.cause
        replica.status, replica.lost_since = status, None
        if status.state == "ready" and replica.phase in (Phase.LAUNCHING, Phase.WAKING, Phase.RESTORING):
            self.launches.outcome(model, replica, None)  # loaded, whether or not its load's reply ever comes
        elif status.state != "failed":
            replica.move(Event.HELD)
        elif replica.phase in (Phase.READY, Phase.RECORDED, Phase.LOST, Phase.MOVING):
            replica.move(Event.FAILED)  # its worker gave up on it
        return True

    def lost(self, model: Model, r: Replica, why: str, event: Event) -> None:
        """A replica no worker holds: loaded again, unless it came from the launch book at start and is not to be
        restored (its launch said restore=False, or the restore setting is off): then the model is idle-unloaded."""
        if r.phase is Phase.RECORDED and (not model.restore or not self.settings.restore):
            self.launches.mark_unloaded(model, "not restored when the mesh started (restore is off); loads on its "
                                               "first request", Event.NOT_RESTORED)
            return
        r.restart(why, event)

    def on_tick(self, event: ev.Tick) -> None:
        now = self.clock()
        for wid, state in list(self.workers.items()):
            if now - state.last_seen > self.settings.liveness_s:
                del self.workers[wid]
                why = f"worker {wid} stopped reporting (nothing for {self.settings.liveness_s:g}s)"
                for model in self.models.values():
                    for r in model.replicas:
                        if r.worker_id == wid and r.phase in (Phase.READY, Phase.LOST, *LOADS):
                            r.restart(why, Event.LOAD_LOST if r.phase in LOADS else Event.WORKER_LOST)
                            r.lost_since = now
                log.warning("worker_lost", worker=wid)
        if now - self.started > self.settings.liveness_s:  # launches remembered from before a restart
            for model in self.models.values():
                for r in model.replicas:
                    if r.phase is Phase.RECORDED and r.worker_id not in self.workers:
                        self.lost(model, r, f"worker {r.worker_id} has not reported since the scheduler restarted",
                                  Event.WORKER_LOST)
                        r.lost_since = now
        self.terminated = {uid: t for uid, t in self.terminated.items() if now - t < self.settings.liveness_s}
        self.launches.expire_idle()
        self.reconcile()

    # ------------------------------------------------------------------ desired state

    def reconcile(self) -> None:
        """Load what is desired but not held: on its worker when that worker is there, on another one when its
        worker has been gone for worker_return_s."""
        now = self.clock()
        for model in self.models.values():
            if model.terminating or model.error or model.unloaded:
                continue
            for r in model.replicas:
                if r.phase is not Phase.LOST or now < r.next_try or r.load is None:
                    continue
                if r.worker_id in self.workers:
                    r.move(Event.RESTORE)
                    self.send_restore(model, r)
                elif r.lost_since is not None and now - r.lost_since >= self.settings.worker_return_s:
                    r.move(Event.MOVE)
                    self.send_probe(model, r)

    def send_probe(self, model: Model, r: Replica) -> None:
        """Ask every worker whether it can take a replica whose worker stays away."""
        load = r.load
        probe = p.ProbeFiles(model_type=load.model_type, spec=load.spec, quantization=load.quantization,
                             embedding=load.embedding, rerank=load.rerank,
                             projector=load.options.multimodal_projector or "")
        uid, incarnation, index = model.uid, model.incarnation, r.index
        self.effects.ask_all(list(self.workers), probe, 10.0, lambda found: ev.Probed(uid, incarnation, index, found))

    def send_restore(self, model: Model, r: Replica) -> None:
        r.restores += 1
        cause = r.status.cause or "restored"
        log.info("restoring_instance", model_uid=model.uid, replica=r.index, worker=r.worker_id, cause=cause)
        self.launches.send_load(model, r, cause)

    def restored(self, model: Model, r: Replica, error: ZinferError | None) -> None:
        """A restore's outcome: ready, again later (the worker could not now), or failed for good."""
        if error is None:
            r.move(Event.LOADED)
            if r.state in ("restarting", "launching"):
                r.status.state, r.status.progress = "ready", 1.0
            model.last_active = time.time()
            log.info("restored_instance", model_uid=model.uid, replica=r.index, worker=r.worker_id)
        elif isinstance(error, RETRYABLE):
            r.move(Event.RETRY_LATER)
            r.next_try = self.clock() + max(2.0, self.settings.liveness_s)
            log.warning("restore_failed", model_uid=model.uid, worker=r.worker_id, error=str(error))
        else:
            r.fail(error.message, error.code, error.field)

    def on_probed(self, event: ev.Probed) -> None:
        """Its worker has not come back: place the replica on another worker that has the files and the memory."""
        model, r = self.launches.replica(event.uid, event.incarnation, event.index)
        if r is None or r.phase is not Phase.MOVING:
            return  # terminated, or its worker came back meanwhile
        lost = r.worker_id
        try:
            slots = slots_of(self.workers, event.found)
            if not slots:
                raise Unavailable("no other worker can take it now")
            pins = model.pins
            wid = place(slots, 1, pins.n_gpu, pins.gpu_idx, pins.devices, pins.worker_ip)[0]
        except ZinferError as exc:
            r.move(Event.MOVE_FAILED)
            r.next_try = self.clock() + max(5.0, self.settings.worker_return_s / 4)
            r.lost_cause = r.lost_cause or r.status.cause  # why it is restarting, before any failed move
            r.status.cause = f"{r.lost_cause}; no other worker can take it yet: {exc.message}"
            log.warning("move_failed", model_uid=model.uid, replica=r.index, error=str(exc))
            return
        r.worker_id, r.lost_since, r.lost_cause = wid, None, ""
        r.load = msgspec.structs.replace(r.load, memory_estimate=event.found[wid].memory)
        r.status.cause = f"{r.status.cause}; moved from {lost} to {wid}"
        self.workers[wid].reserved[(model.uid, r.index)] = event.found[wid].memory
        r.move(Event.MOVED)
        self.record_quietly()
        log.info("moving_instance", model_uid=model.uid, replica=r.index, from_worker=lost, to_worker=wid)
        self.send_restore(model, r)

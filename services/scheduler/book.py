"""The scheduler's book: what it knows of each launched model and its replicas, the launch file that keeps the
desired state across its own restarts, and the view `zinfer list` shows. Pure state, no I/O but the file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog

from zinfer.services.scheduler.machine import Event, Phase, next_phase
from zinfer.shared import instances
from zinfer.shared import protocol as p
from zinfer.shared.atomic import write_atomic
from zinfer.shared.errors import ZinferError, reply_from_exception, storage_error
from zinfer.shared.message import ErrorCode

log = structlog.get_logger()


@dataclass
class Replica:
    worker_id: str
    index: int
    load: p.LoadInstance | None = None  # what loads it (None only for an instance adopted from a worker's report)
    status: instances.ReplicaStatus = field(default_factory=instances.ReplicaStatus)  # its worker's last word, or ours
    phase: Phase = Phase.READY  # where it is in its life (services/scheduler/machine.py); only the loop moves it
    restores: int = 0  # loads the scheduler sent again (its worker restarted, or it moved)
    lost_since: float | None = None  # when its worker was lost (moved elsewhere after worker_return_s)
    lost_cause: str = ""  # why it is restarting, kept while moves to another worker fail
    next_try: float = 0.0  # a failed restore is tried again from then
    before_terminate: Phase | None = None  # where a terminate that fails puts it back
    attempt: int = 0  # the number of the latest load sent: an outcome of an earlier one is stale

    @property
    def state(self) -> instances.InstanceState:
        return self.status.state

    def move(self, event: Event) -> None:
        """Take an event: the state machine's table says where it goes (IllegalMove when nowhere)."""
        if event is Event.TERMINATE and self.phase is not Phase.TERMINATING:
            self.before_terminate = self.phase
        if event is Event.TERMINATE_FAILED and self.phase is Phase.TERMINATING:
            self.phase = self.before_terminate or Phase.LOST
            return
        self.phase = next_phase(self.phase, event)

    def restart(self, why: str, event: Event = Event.MISSING) -> None:
        """Desired, not held: `restarting` with the cause until the reconciler has it loaded again."""
        if self.load is None:
            self.fail(f"{why}; its launch was not recorded, so it cannot be loaded again (terminate and launch it)")
            return
        self.move(event)
        self.status = instances.ReplicaStatus(state="restarting", cause=why, memory=self.status.memory,
                                              restarts=self.status.restarts, stats=self.status.stats)

    def fail(self, why: str, code: ErrorCode = "unavailable", field: str | None = None) -> None:
        if self.phase is not Phase.FAILED:
            self.move(Event.FAILED)
        self.status = msgspec.structs.replace(self.status, state="failed",
                                              error=p.Error(code=code, message=why, field=field))


class Pins(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A launch's placement constraints, kept to place a replica again when its worker does not come back."""

    n_gpu: int | str | None = "auto"
    gpu_idx: list[int] | None = None
    devices: list[str] | None = None
    worker_ip: list[str] | None = None


# Seconds a woken instance waits for the request that woke it before keep_alive may unload it again.
WAKE_GRACE_S = 10.0


@dataclass
class Model:
    uid: str
    info: instances.InstanceInfo
    replicas: list[Replica] = field(default_factory=list)
    error: p.Error | None = None  # a launch that failed: the model stays failed until terminated
    incarnation: int = 0
    pins: Pins = field(default_factory=Pins)
    # Lifecycle: seconds it stays loaded once idle (None: for ever); restored when the mesh starts; wall-clock
    # times of its last request and of its unload (0: loaded); loads so far.
    keep_alive: float | None = None
    restore: bool = True
    last_active: float = 0.0
    unloaded_at: float = 0.0
    loads: int = 1
    woken_at: float = 0.0  # when a load on request last made it ready (0: never): the request that woke it is due

    def _any(self, phase: Phase) -> bool:
        return any(r.phase is phase for r in self.replicas)

    @property
    def unloaded(self) -> bool:
        return bool(self.replicas) and all(r.phase is Phase.UNLOADED for r in self.replicas)

    @property
    def waking(self) -> bool:
        return self._any(Phase.WAKING)

    @property
    def terminating(self) -> bool:
        return self._any(Phase.TERMINATING)

    @property
    def idle(self) -> bool:
        """No replica has work (running or queued), as their last reports say."""
        return not any(r.status.inflight or r.status.queue_depth for r in self.replicas)

    def active_at(self) -> float:
        """When it last took a request (or was loaded): what keep_alive and the LRU cap count from."""
        return max([self.last_active, *(r.status.last_active for r in self.replicas)])

    def expires_at(self) -> float | None:
        """When keep_alive unloads it. A woken instance waits up to WAKE_GRACE_S for a request to reach it first:
        the requests that woke it are on their way (their clients poll until it is ready, then send), and with a
        short keep_alive (0) it would otherwise be unloaded again before they land."""
        if self.keep_alive is None or self.unloaded or self.state != "ready":
            return None
        deadline = self.active_at() + self.keep_alive
        if self.woken_at and max((r.status.last_active for r in self.replicas), default=0.0) < self.woken_at:
            deadline = max(deadline, self.woken_at + WAKE_GRACE_S)
        return deadline

    @property
    def state(self) -> instances.InstanceState:
        states = {r.state for r in self.replicas}
        if self.terminating:
            return "terminating"
        if "failed" in states or self.error:
            return "failed"
        if self.unloaded:
            return "idle-unloaded"
        if "launching" in states or not states:
            return "launching"
        if "restarting" in states:
            return "restarting"
        return "ready" if states == {"ready"} else "launching"

    def launch_failed(self, exc: ZinferError) -> None:
        self.error = reply_from_exception(exc)


@dataclass
class WorkerState:
    info: instances.DeviceInfo
    last_seen: float
    reserved: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.info.free_memory - sum(self.reserved.values())


def release(workers: dict[str, WorkerState], wids, uid: str) -> None:
    """Drop every memory reservation a model holds on these workers."""
    for wid in wids:
        if wid in workers:
            workers[wid].reserved = {k: v for k, v in workers[wid].reserved.items() if k[0] != uid}


class LaunchRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the scheduler remembers of a launch across its own restarts (placement and a launch's failure)."""

    uid: str
    info: instances.InstanceInfo
    replicas: list[tuple[str, int]] = []  # (worker id, replica index)
    error: p.Error | None = None
    incarnation: int = 0
    loads: list[p.LoadInstance] = []  # each replica's load, in the order of `replicas`
    pins: Pins = msgspec.field(default_factory=Pins)
    keep_alive: float | None = None
    restore: bool = True
    last_active: float = 0.0
    unloaded_at: float = 0.0
    times_loaded: int = 1

    @classmethod
    def of(cls, m: Model) -> LaunchRecord:
        return cls(uid=m.uid, info=m.info, replicas=[(r.worker_id, r.index) for r in m.replicas], error=m.error,
                   incarnation=m.incarnation, loads=[r.load for r in m.replicas if r.load is not None], pins=m.pins,
                   keep_alive=m.keep_alive, restore=m.restore, last_active=m.active_at(),
                   unloaded_at=m.unloaded_at, times_loaded=m.loads)

    def model(self) -> Model:
        """The model as the scheduler starts with it: RECORDED until its worker reports (failed and idle-unloaded
        ones stay so)."""
        loads = {load.replica: load for load in self.loads}
        phase = Phase.FAILED if self.error else Phase.UNLOADED if self.unloaded_at else Phase.RECORDED
        state = {Phase.FAILED: "failed", Phase.UNLOADED: "idle-unloaded"}.get(phase, "launching")
        return Model(uid=self.uid, info=self.info, error=self.error, incarnation=self.incarnation, pins=self.pins,
                     replicas=[Replica(worker_id=wid, index=index, load=loads.get(index), phase=phase,
                                       status=instances.ReplicaStatus(state=state))
                               for wid, index in self.replicas],
                     keep_alive=self.keep_alive, restore=self.restore, last_active=self.last_active,
                     unloaded_at=self.unloaded_at, loads=self.times_loaded)


# Before 2026-12 a record kept the model's fields and its error flat; read such files as they are.
_FLAT_INFO = {"model_name": "model_name", "model_type": "model_type", "model_format": "model_format",
              "size": "model_size_in_billions", "quantization": "quantization"}


def _upgrade(record: dict) -> dict:
    if "info" in record or not isinstance(record, dict):
        return record
    record = dict(record)
    record["info"] = {new: record.pop(old) for old, new in _FLAT_INFO.items() if old in record}
    message, code, field_ = record.pop("error", ""), record.pop("error_code", ""), record.pop("error_field", None)
    if message:
        record["error"] = {"op": "Error", "code": code or "internal", "message": message, "field": field_}
    return record


class LaunchBook:
    """<home>/scheduler/launched.json: the launched uids, written atomically at each launch and terminate, so that
    a restarted scheduler never forgets an acknowledged launch: what the workers still hold is `ready` again,
    what no worker holds any more is `failed` with the reason (instead of vanishing)."""

    def __init__(self, home: Path):
        self.path = home / "scheduler" / "launched.json"

    def load(self) -> list[LaunchRecord]:
        try:
            raw = msgspec.json.decode(self.path.read_bytes())
            return msgspec.convert([_upgrade(r) for r in raw], list[LaunchRecord])
        except FileNotFoundError:
            return []
        except (OSError, TypeError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("launch_book_unreadable", path=str(self.path), error=str(exc))
            return []

    def save(self, records: list[LaunchRecord]) -> None:
        """Write the launched models (only the scheduler's loop calls this, so snapshots land in order)."""
        try:
            write_atomic(self.path, msgspec.json.encode(records))
        except OSError as exc:
            raise storage_error("record the launch in", self.path, exc) from None


def view(m: Model, workers: dict[str, WorkerState]) -> instances.InstanceView:
    """A model and its replicas as `zinfer list` shows them: sums over replicas, the first failure, where each runs."""
    replicas = m.replicas
    failed = next((r.status.error for r in replicas if r.state == "failed" and r.status.error), None)
    where = {wid: w.info for wid, w in workers.items()}
    return instances.InstanceView(
        model_uid=m.uid, info=m.info, replica=len(replicas), state=m.state, error=m.error or failed,
        devices=[r.worker_id for r in replicas],
        hosts=[where[r.worker_id].host if r.worker_id in where else "?" for r in replicas],
        address=[f"{(where[r.worker_id].address or where[r.worker_id].host) if r.worker_id in where else '?'}"
                 f"/{p.worker_service(r.worker_id)}" for r in replicas],
        progress=sum(r.status.progress for r in replicas) / max(1, len(replicas)),
        stage=next((r.status.stage for r in replicas if r.state in ("launching", "restarting") and r.status.stage), ""),
        memory=sum(r.status.memory for r in replicas), queue_depth=sum(r.status.queue_depth for r in replicas),
        inflight=sum(r.status.inflight for r in replicas), stats=sum_stats(r.status.stats for r in replicas),
        pids=[r.status.pid for r in replicas], restarts=sum(r.status.restarts + r.restores for r in replicas),
        restart_cause=next((r.status.cause for r in replicas if r.state == "restarting" and r.status.cause),
                           next((r.status.cause for r in replicas if r.status.cause), "")),
        keep_alive=m.keep_alive, expires_at=m.expires_at(), last_active=m.active_at(), unloaded_at=m.unloaded_at,
        loads=m.loads, loading_on_request=m.waking, restore=m.restore)


def sum_stats(parts) -> instances.InstanceStats:
    total = instances.InstanceStats()
    for part in parts:
        if part is not None:
            for name in instances.InstanceStats.__struct_fields__:
                setattr(total, name, getattr(total, name) + getattr(part, name))
    return total


class LastLaunches:
    """<home>/scheduler/last_launch.json: each model name's last launch request, so that a load on request by
    name (or the web UI) uses the options it was last launched with. Written atomically at each launch."""

    def __init__(self, home: Path):
        self.path = home / "scheduler" / "last_launch.json"
        try:
            self.launches = msgspec.json.decode(self.path.read_bytes(), type=dict[str, p.LaunchModel])
        except FileNotFoundError:
            self.launches = {}
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("last_launch_unreadable", path=str(self.path), error=str(exc))
            self.launches = {}

    def get(self, model_name: str) -> p.LaunchModel | None:
        return self.launches.get(model_name)

    def put(self, msg: p.LaunchModel) -> None:
        """(The scheduler's loop only.) Remember a launch that was placed."""
        self.launches[msg.model_name] = msg
        try:
            write_atomic(self.path, msgspec.json.encode(self.launches))
        except OSError as exc:
            log.error("last_launch_write_failed", path=str(self.path), error=str(exc))

"""What reaches the scheduler's loop (services/scheduler/core.py): requests from its handlers, worker reports,
timer ticks and the results of slow work, one event type each; and `Effects`, the slow work itself (calls to
workers), which runs off the loop and posts its results back as events.

An event that carries a `reply` future is answered once the loop has handled it (and written the launch book
when it changed what is launched); the handler thread that posted it waits on that future.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from zinfer.shared import protocol as p
from zinfer.shared.errors import ZinferError

log = structlog.get_logger()


@dataclass
class Ev:
    reply: Future | None = field(default=None, kw_only=True)


@dataclass
class Report(Ev):
    """A worker's heartbeat: its device and the instances it holds."""

    msg: p.WorkerReport


@dataclass
class Tick(Ev):
    """Every heartbeat interval: workers that stopped reporting, instances idle for their keep_alive, and what is
    desired but not held."""


@dataclass
class Place(Ev):
    """A checked launch whose files the workers have probed: place it, reserve memory, record it, load it."""

    launch: p.LaunchModel
    base: p.LoadInstance
    found: dict[str, p.FileProbe]
    keep_alive: float | None


@dataclass
class Loaded(Ev):
    """A LoadInstance's outcome (error None: loaded); `attempt` says which load it answers."""

    uid: str
    incarnation: int
    index: int
    error: ZinferError | None = None
    attempt: int = 0


@dataclass
class Probed(Ev):
    """The workers' answers for a replica that moves: which can take it (error: none could answer)."""

    uid: str
    incarnation: int
    index: int
    found: dict[str, p.FileProbe]


@dataclass
class Wake(Ev):
    uid: str


@dataclass
class SetKeepAlive(Ev):
    uid: str
    seconds: float | None


@dataclass
class Adapters(Ev):
    """A launch's LoRA adapters. With no change, the reply is (the (worker, index) of each replica, its adapters)
    for a ready LLM (an error otherwise); with `add` or `drop`, that change to the adapters its replicas load
    (a restart or a restore keeps them), applied to the loop's state and recorded."""

    uid: str
    add: p.LoraAdapter | None = None
    drop: str | None = None


@dataclass
class Terminate(Ev):
    """Begin a terminate: its replicas become TERMINATING; the reply is (incarnation, the workers holding it,
    the workers running now)."""

    uid: str


@dataclass
class Terminated(Ev):
    """The unloads of a terminate are done (error: one worker refused, and the model stays)."""

    uid: str
    incarnation: int
    error: ZinferError | None = None


@dataclass
class LastLaunch(Ev):
    """The options a model name was last launched with (None: never), for a load on request by its name."""

    model_name: str


@dataclass
class Sync(Ev):
    """Nothing to do: answered once every event posted before it is handled (tests and shutdown wait on it)."""


class Effects:
    """Calls to workers off the loop, each outcome posted back to the loop as the event `then` makes of it."""

    def __init__(self, bus, post: Callable[[Ev], None], max_workers: int = 256):
        # Many threads, mostly waiting: a call to a worker that has just died waits (parked at the broker) until
        # it returns or the call times out, and must never hold up the loads behind it.
        self.bus = bus
        self.post = post
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="scheduler-effects")
        self._inflight: set[tuple] = set()
        self._lock = threading.Lock()

    def call(self, worker_id: str, msg: p.Msg, timeout: float,
             then: Callable[[ZinferError | None], Ev | None] | None = None) -> None:
        """Send msg to a worker; `then` makes the event its outcome posts. An unload already on its way to that
        worker for the same replica is not sent twice (reports repeat a leftover every heartbeat)."""
        key = (worker_id, msg.model_uid, msg.incarnation, msg.replica) if isinstance(msg, p.UnloadInstance) else None
        if key is not None:
            with self._lock:
                if key in self._inflight:
                    return
                self._inflight.add(key)
        self.pool.submit(self._call, worker_id, msg, timeout, then, key)

    def _call(self, worker_id, msg, timeout, then, key) -> None:
        error = None
        try:
            self.bus.call(p.worker_service(worker_id), msg, timeout=timeout)
        except ZinferError as exc:
            error = exc
            if then is None:
                log.info("worker_call_failed", worker=worker_id, request=type(msg).__name__, error=str(exc))
        finally:
            if key is not None:
                with self._lock:
                    self._inflight.discard(key)
        event = then(error) if then is not None else None
        if event is not None:
            self.post(event)

    def ask_all(self, workers: list[str], msg: p.Msg, timeout: float,
                then: Callable[[dict[str, p.Msg]], Ev]) -> None:
        self.pool.submit(lambda: self.post(then(ask_workers(self.bus, workers, msg, timeout, type(msg).__name__))))


def ask_workers(bus, workers: list[str], msg: p.Msg, timeout: float, what: str) -> dict[str, p.Msg]:
    """Send msg to every worker (16 at a time); their replies by worker id. A worker that cannot answer now is
    left out (logged)."""
    replies: dict[str, p.Msg] = {}
    if not workers:
        return replies
    with ThreadPoolExecutor(max_workers=min(16, len(workers))) as pool:
        futures = {wid: pool.submit(bus.call, p.worker_service(wid), msg, timeout) for wid in workers}
        for wid, future in futures.items():
            try:
                replies[wid] = future.result()
            except ZinferError as exc:
                log.warning(f"{what}_failed", worker=wid, error=str(exc))
    return replies

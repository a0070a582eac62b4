"""An instance process's compute loop: its batcher steps, one bounded step at a time.

A step is one embedding batch (capped by items and tokens; a huge request is split over many steps) or one
decode step for the sequences a generation batcher holds, so a request that arrives during a huge one waits one
step, not the whole request (a 20,000-text embed once held a one-sentence embed for 51.6 s). The loop takes
batchers round-robin; an instance process holds one (each replica has its own process since issue 20). It runs
on the process's main thread: PyTorch's CPU kernels are 10-25% slower from a secondary thread (MiniLM: 8.3 vs
6.9 ms per sentence, 363 vs 322 ms per 256).

Requests reach a batcher from the I/O thread through its bounded queue (`Batcher.submit`); replies go back
through the runtime's send (an inproc socket to the I/O thread). No thread per request, none per stream.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import structlog

from zinfer.shared import instances
from zinfer.shared import protocol as p
from zinfer.shared.errors import Cancelled, InternalError, QueueFull, reply_from_exception
from zinfer.shared.transport import RequestContext

log = structlog.get_logger()


class Job:
    """One request a batcher holds, from its arrival to its final reply."""

    __slots__ = ("msg", "ctx", "received")

    def __init__(self, msg: Any, ctx: RequestContext):
        self.msg = msg
        self.ctx = ctx
        self.received = time.monotonic()

    @property
    def cancelled(self) -> bool:
        return self.ctx.cancelled

    def partial(self, msg: p.Msg, buffers=()) -> None:
        self.ctx.send(msg, buffers, final=False)

    def reply(self, msg: p.Msg, buffers=()) -> None:
        self.ctx.send(msg, buffers, final=True)

    def fail(self, exc: BaseException) -> None:
        self.ctx.send(reply_from_exception(exc), final=True)

    def drop_cancelled(self) -> None:
        """The client gave up (the final reply only closes the request's books: nobody reads it), or the service is
        stopping (the reply says so, and the client may send the request again)."""
        self.fail(self.ctx.why or Cancelled("cancelled by the client"))


class Batcher(ABC):
    """One model instance's work on the compute thread. submit() runs on the I/O thread; the rest on the loop."""

    name: str

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Queue a request (cheap; raises Unavailable when the queue is full)."""

    @abstractmethod
    def has_work(self) -> bool: ...

    @abstractmethod
    def step(self) -> None:
        """One bounded unit of work: admissions, then one batch or one decode step."""

    @abstractmethod
    def fail_all(self, error: Exception) -> None:
        """Answer every request this batcher holds with `error` (a step failed)."""

    def stop(self, error: Exception) -> None:
        """Answer every request with `error` and take no more (the instance is going away)."""
        self.fail_all(error)

    def wait_hint(self) -> float | None:
        """Seconds until queued work becomes ready (an embedding batch waiting for stragglers), else None."""
        return None

    def depth(self) -> int:
        """Requests waiting (not yet running): `zinfer list` shows it as the queue."""
        return 0


def check_room(name: str, held: int, limit: int) -> None:
    """QueueFull when a batcher already holds its limit of requests."""
    if held >= limit:
        raise QueueFull(f"{name} holds {held} requests (its limit: request_limits, or the instance_queue setting); "
                        "try again")


class QueueBatcher(Batcher):
    """A batcher whose requests wait in one bounded queue of work items (each with its `job`) and run in batches
    (embeddings, rerank, speech), a batch waiting `wait_ms` for stragglers unless it is full already."""

    def __init__(self, uid: str, wake: Callable[[], None], max_queue: int, max_items: int, wait_ms: float):
        self.uid = uid
        self.name = f"model {uid}"
        self.wake = wake
        self.max_queue = max_queue
        self.max_items = max(1, max_items)
        self.wait_s = max(0.0, wait_ms) / 1000
        self.queue: deque = deque()
        self.running = 0  # requests taken off the queue that the current step works on (not answered yet)
        self.stats = instances.InstanceStats()

    def _enqueue(self, work) -> None:
        check_room(self.name, len(self.queue), self.max_queue)
        self.queue.append(work)
        self.wake()

    def _items_queued(self) -> int:
        """How much a batch could take now (requests; the embedding batcher counts texts)."""
        return len(self.queue)

    def depth(self) -> int:
        return len(self.queue)

    def inflight(self) -> int:
        """Requests a step holds: reports show them, so an idle unload (keep_alive) never cuts one off."""
        return self.running

    def has_work(self) -> bool:
        if not self.queue:
            return False
        if self.wait_s and time.monotonic() - self.queue[0].job.received < self.wait_s:
            return self._items_queued() >= self.max_items
        return True

    def wait_hint(self) -> float | None:
        if self.queue and self.wait_s:
            return max(0.0, self.queue[0].job.received + self.wait_s - time.monotonic())
        return None

    def fail_all(self, error: Exception) -> None:
        self.stats.failures += len(self.queue)
        while self.queue:
            self.queue.popleft().job.fail(error)


class ComputeLoop:
    def __init__(self) -> None:
        self._batchers: tuple[Batcher, ...] = ()
        self._wake = threading.Event()
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: int | None = None

    def add(self, batcher: Batcher) -> None:
        self._batchers = (*self._batchers, batcher)
        self.wake()

    def remove(self, batcher: Batcher) -> None:
        self._batchers = tuple(e for e in self._batchers if e is not batcher)

    def wake(self) -> None:
        self._wake.set()

    def call(self, fn: Callable, *args) -> Any:
        """Run fn(*args) on the loop's thread between steps and return its result (at once when the loop is not
        running, or when called from it): how a batcher's model is freed without pulling it from under a step."""
        if self._thread is None or self._thread == threading.get_ident():
            return fn(*args)
        future: Future = Future()
        self._calls.put((fn, args, future))
        self.wake()
        return future.result()

    def _run_calls(self) -> None:
        if self._calls.empty():  # the usual case, checked before every round (get_nowait raises: ~1 us)
            return
        while True:
            try:
                fn, args, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    def run(self, keep_going: Callable[[], bool]) -> None:
        """The loop; returns once keep_going() is false and no batcher has work."""
        self._thread = threading.get_ident()
        try:
            while True:
                self._run_calls()
                busy = False
                for batcher in self._batchers:  # one step each per round: round-robin by turns
                    if not batcher.has_work():
                        continue
                    busy = True
                    try:
                        batcher.step()
                    except Exception as exc:  # a bug in a batcher fails its requests, never the worker
                        log.error("batcher_step_failed", batcher=batcher.name, exc_info=exc)
                        batcher.fail_all(InternalError(f"{batcher.name}: {type(exc).__name__}: {exc}"))
                if busy:
                    continue
                if not keep_going():
                    return
                hints = [h for e in self._batchers if (h := e.wait_hint()) is not None]
                self._wake.wait(min([0.2, *hints]))
                self._wake.clear()
        finally:
            self._thread = None
            self._run_calls()

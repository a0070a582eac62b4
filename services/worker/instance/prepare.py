"""A generation batcher's requests made ready off the compute loop, on a thread of their own.

Before a request can decode, its chat is rendered through the template, its prompt tokenized (56,000 tokens take
about 50 ms), its images decoded and processed (a 12-megapixel PNG: about 320 ms on transformers), and its
grammar compiled. On the compute loop each of those stopped every other stream for that long; here they run
beside the decode, which releases the GIL in torch's kernels and llama.cpp's. One thread per batcher, taking
requests in their order of arrival, so admission stays first come, first served. What the engine's own context
holds (llama.cpp's multimodal encoder) stays on the compute loop.

The compute loop takes what is ready from `ready` (a deque: appended here, popped there); `close` answers
everything held, and whatever was being prepared then, so that no request is left unanswered when the instance
goes away.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from zinfer.services.worker.instance.compute import Job
from zinfer.shared.errors import InternalError

log = structlog.get_logger()


class Preparer:
    def __init__(self, name: str, prepare: Callable[[Job], Any], on_ready: Callable[[], None]):
        self.name = name
        self._prepare = prepare  # Job -> the item the compute loop takes; never raises (errors ride on the item)
        self._on_ready = on_ready
        self._incoming: deque[Job] = deque()
        self.ready: deque = deque()
        self._busy: Job | None = None
        self._closed: BaseException | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, job: Job) -> None:
        with self._cond:
            if self._closed is not None:
                raise self._closed
            self._incoming.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"prepare {self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()

    def held(self) -> int:
        """Requests here: arrived, being prepared, or ready and not yet taken."""
        return len(self._incoming) + (self._busy is not None) + len(self.ready)

    def waiting(self) -> int:
        return len(self._incoming) + len(self.ready)

    def preparing(self) -> int:
        return int(self._busy is not None)

    def take(self, which: Callable[[Job], bool]) -> list[Job]:
        """Remove and return the arrived and ready requests `which` picks (the one being prepared stays)."""
        with self._cond:
            items = [item for item in self.ready if which(item.job)]
            jobs = [job for job in self._incoming if which(job)]
            for item in items:
                self.ready.remove(item)
            for job in jobs:
                self._incoming.remove(job)
        return [item.job for item in items] + jobs

    def drain(self) -> list[Job]:
        """Remove and return every arrived and ready request."""
        return self.take(lambda job: True)

    def close(self, error: BaseException) -> None:
        """Take no more (put raises `error`); the request being prepared now is answered with `error` when its
        preparation ends. The rest stays for the caller to drain and answer."""
        with self._cond:
            self._closed = error
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Until nothing is arrived or being prepared (what is ready may wait to be taken): for tests."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._incoming and self._busy is None, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._incoming or self._closed is not None)
                if self._closed is not None:
                    return
                job = self._busy = self._incoming.popleft()
            try:
                item = self._prepare(job)
            except Exception as exc:  # a bug in preparing fails its request, never the thread
                log.error("prepare_failed", batcher=self.name, exc_info=exc)
                item = None
                job.fail(InternalError(f"{self.name}: {type(exc).__name__}: {exc}"))
            with self._cond:
                self._busy = None
                closed = self._closed
                if closed is None and item is not None:
                    self.ready.append(item)
                self._cond.notify_all()
            if closed is not None:
                if item is not None:
                    job.fail(closed)
                return
            self._on_ready()

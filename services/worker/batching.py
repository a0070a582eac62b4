"""Dynamic batching for embeddings: concurrent requests to one instance run as one `encode` call.

While a batch is encoding, new requests queue; the next batch takes all of them (up to max_batch_size rows),
after waiting up to `wait_ms` for more. Each caller gets its own rows back in order; a request that fails
(too long, or its texts break the encoder) fails alone.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from services.worker.backends.base import EmbeddingBackend
from shared.errors import TooLarge

ADAPTIVE_WAIT_S = 0.002


class _Job:
    __slots__ = ("texts", "done", "result", "error")

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.done = threading.Event()
        self.result: tuple[np.ndarray, int] | None = None
        self.error: BaseException | None = None


class EmbeddingBatcher:
    def __init__(self, backend: EmbeddingBackend, max_batch_size: int = 256, wait_ms: float = 0.0,
                 run_on: Callable | None = None):
        self.backend = backend
        # Where encode runs: the worker passes its main-thread executor (torch is faster there).
        self.run_on = run_on or (lambda fn, *args: fn(*args))
        self.max_batch_size = max(1, max_batch_size)
        self.wait_s = max(0.0, wait_ms) / 1000
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self._last_jobs = 0
        self.thread = threading.Thread(target=self._loop, name="embed-batcher", daemon=True)
        self.thread.start()

    def submit(self, texts: list[str]) -> tuple[np.ndarray, int]:
        job = _Job(texts)
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _gather(self, first: _Job) -> list[_Job]:
        batch, rows = [first], len(first.texts)
        # Without a configured wait, wait a little only while requests come concurrently (the last batch held
        # several): a lone client pays nothing, a crowd is gathered into fewer, larger batches.
        wait = self.wait_s if self.wait_s else (ADAPTIVE_WAIT_S if self._last_jobs > 1 else 0.0)
        deadline = time.monotonic() + wait
        while rows < self.max_batch_size:
            try:
                left = deadline - time.monotonic()
                job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)  # keep the stop signal for the loop
                break
            batch.append(job)
            rows += len(job.texts)
        self._last_jobs = len(batch)
        return batch

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            self.run_on(self._run, self._gather(first))

    def _run(self, batch: list[_Job]) -> None:
        ok: list[tuple[_Job, list[int]]] = []
        for job in batch:
            try:
                counts = self.backend.token_counts(job.texts)
                for i, n in enumerate(counts):
                    if n > self.backend.max_tokens:
                        raise TooLarge(f"input[{i}] has {n} tokens; this model takes at most "
                                       f"{self.backend.max_tokens}", field=f"input[{i}]")
                ok.append((job, counts))
            except BaseException as exc:
                job.error = exc
                job.done.set()
        if not ok:
            return
        try:
            vectors = self.backend.encode([t for job, _ in ok for t in job.texts])
            start = 0
            for job, counts in ok:
                job.result = (vectors[start:start + len(job.texts)], sum(counts))
                start += len(job.texts)
        except BaseException as exc:
            if len(ok) == 1:
                ok[0][0].error = exc
            else:  # find the culprit: each request on its own, so only a failing one fails
                for job, counts in ok:
                    try:
                        job.result = (self.backend.encode(job.texts), sum(counts))
                    except BaseException as exc:
                        job.error = exc
        for job, _ in ok:
            job.done.set()

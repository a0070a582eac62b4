"""Embeddings on the compute loop: concurrent requests to one instance run as one `encode` call.

While a batch encodes, new requests queue; the next step takes what is queued, up to `max_batch_size` texts
and `max_batch_tokens` padded tokens (the longest text x the texts), so one step stays bounded: a request of
20,000 texts is split into many batches, and requests that arrive meanwhile are served between them.
With `batch_wait_ms` a batch waits that long for stragglers. Each request gets its own rows back in order; one
that fails (a text over the model's max_tokens, or texts that break the encoder) fails alone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from zinfer.services.worker.instance.backends.base import EmbeddingBackend
from zinfer.services.worker.instance.compute import Job, QueueBatcher
from zinfer.shared import protocol as p
from zinfer.shared.errors import InvalidRequest, TooLarge


def check_dimensions(uid: str, wanted: int | None, full: int, normalized: bool) -> None:
    """Refuse a request's `dimensions` this model cannot give: more than it makes, or fewer when its vectors are
    not unit length (cutting them would change what their distances mean)."""
    if wanted is None or wanted == full:
        return
    if wanted > full:
        raise InvalidRequest(f"dimensions: model {uid!r} makes {full}-dimensional embeddings; ask for at most "
                             f"{full}", field="dimensions")
    if not normalized:
        raise InvalidRequest(f"dimensions: model {uid!r} makes {full}-dimensional embeddings that are not "
                             "normalised, so they cannot be cut to fewer; leave dimensions out", field="dimensions")


def cut(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first `dimensions` of each row, renormalised to unit length (OpenAI's `dimensions`)."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    part = vectors[:, :dimensions]
    norms = np.linalg.norm(part, axis=1, keepdims=True)
    return np.ascontiguousarray(part / np.where(norms == 0, 1, norms), dtype=np.float32)


class _Work:
    """One request on its way: how far its batches have got, and the results so far."""

    __slots__ = ("job", "texts", "next", "parts", "tokens")

    def __init__(self, job: Job, texts: list):
        self.job = job
        self.texts = texts  # texts to embed, or (query, document) pairs to score
        self.next = 0
        self.parts: list[np.ndarray] = []
        self.tokens = 0


class EmbeddingBatcher(QueueBatcher):
    def __init__(self, uid: str, backend: EmbeddingBackend, wake: Callable[[], None], max_queue: int,
                 max_batch_size: int = 256, max_batch_tokens: int = 16384, wait_ms: float = 0.0):
        super().__init__(uid, wake, max_queue, max_batch_size, wait_ms)
        self.backend = backend
        self.max_tokens = max(1, max_batch_tokens)

    def submit(self, job: Job) -> None:
        self._enqueue(_Work(job, self._texts(job.msg)))

    def _texts(self, msg: p.Embed) -> list:
        """What one request has the backend encode (checked here, before it queues)."""
        check_dimensions(self.uid, msg.dimensions, self.backend.dimensions, self.backend.normalized)
        return msg.input

    def _items_queued(self) -> int:
        return sum(len(w.texts) - w.next for w in self.queue)

    def step(self) -> None:
        batch: list[tuple[_Work, int]] = []  # each request's texts in this batch: (work, how many)
        texts: list[str] = []
        longest = 0
        while self.queue and len(texts) < self.max_items:
            work = self.queue[0]
            if work.job.cancelled:
                self.queue.popleft()
                work.job.drop_cancelled()
                self.stats.cancelled += 1
                continue
            if work.next == 0:
                self.stats.requests += 1
            chunk = work.texts[work.next:work.next + self.max_items - len(texts)]
            counts = self.backend.token_counts(chunk)
            too_long = next((i for i, n in enumerate(counts) if n > self.backend.max_tokens), None)
            if too_long is not None:
                self.queue.popleft()
                at = f"input[{work.next + too_long}]"
                self.stats.failures += 1
                work.job.fail(TooLarge(f"{at} has {counts[too_long]} tokens; this model takes at most "
                                       f"{self.backend.max_tokens}", field=at))
                continue
            take = 0
            for n in counts:  # at least one text per step, then as many as the padded-token budget allows
                if texts or take:
                    if max(longest, n) * (len(texts) + take + 1) > self.max_tokens:
                        break
                longest = max(longest, n)
                take += 1
            texts += chunk[:take]
            work.tokens += sum(counts[:take])
            self.stats.tokens_in += sum(counts[:take])
            work.next += take
            batch.append((work, take))
            if work.next < len(work.texts):
                break  # the rest of a big request waits for this batcher's next turn
            self.queue.popleft()
        if texts:
            self._encode(batch, texts)

    def _encode(self, batch: list[tuple[_Work, int]], texts: list[str]) -> None:
        try:
            vectors = self.backend.encode(texts)
        except Exception:
            # Find the culprit: each request's texts on their own, so that only a failing one fails.
            for work, count in batch:
                part = texts[:count]
                texts = texts[count:]
                try:
                    work.parts.append(self.backend.encode(part))
                    self._finish(work)
                except Exception as exc:
                    self._drop(work)
                    self.stats.failures += 1
                    work.job.fail(exc)
            return
        start = 0
        for work, count in batch:
            work.parts.append(vectors[start:start + count])
            start += count
            self._finish(work)

    def _drop(self, work: _Work) -> None:
        if work in self.queue:
            self.queue.remove(work)

    def _finish(self, work: _Work) -> None:
        if work.next < len(work.texts):
            return
        vectors = np.ascontiguousarray(work.parts[0] if len(work.parts) == 1 else np.vstack(work.parts),
                                       dtype=np.float32)
        vectors = cut(vectors, work.job.msg.dimensions)
        reply = p.Embedding(model=self.uid, rows=vectors.shape[0],
                            dimensions=vectors.shape[1], prompt_tokens=work.tokens)
        work.job.reply(reply, [memoryview(vectors).cast("B")])

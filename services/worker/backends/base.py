"""The interface the worker calls; each engine module implements it."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np


class Sampling(NamedTuple):
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop_token_ids: tuple[int, ...]
    repetition_penalty: float | None


def finish_reason(last: int | None, stop_ids, produced: int, max_tokens: int) -> str:
    """"stop" when an end token came (or generation ended early), "length" when max_tokens ran out."""
    return "stop" if (last in stop_ids or produced < max_tokens) else "length"


class Step(NamedTuple):
    """Text produced since the last step, the tokens it took, and why generation ended (on the last)."""

    text: str
    tokens: int
    finish: str | None = None


class LLMBackend(ABC):
    context_length: int
    chat_template: str | None = None  # the model's own (tokenizer / GGUF metadata)
    bos_token: str = ""
    eos_token: str = ""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """The prompt's token ids, as the engine would tokenize it itself (special tokens included)."""

    @abstractmethod
    def stream(self, prompt_ids: list[int], sampling: Sampling, cancelled: threading.Event) -> Iterator[Step]:
        """Generate from already tokenized ids (tokenized once per request: the context check counts them)."""

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def queue_depth(self) -> int:
        return 0

    def close(self) -> None:  # noqa: B027 - engines with nothing to release keep this
        return None


class EmbeddingBackend(ABC):
    dimensions: int
    max_tokens: int

    @abstractmethod
    def token_counts(self, texts: list[str]) -> list[int]: ...

    @abstractmethod
    def encode(self, texts: list[str]) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - engines with nothing to release keep this
        return None


class FairLock:
    """A FIFO lock for single-sequence engines: requests run in arrival order; `depth` is the queue length."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    @property
    def depth(self) -> int:
        return max(0, len(self._queue) - 1)

    def __enter__(self):
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            self._cond.wait_for(lambda: self._queue[0] is ticket)
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._queue.popleft()
            self._cond.notify_all()

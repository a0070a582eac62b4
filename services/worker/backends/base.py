"""The interface the worker's engines call; each engine module implements it.

Generation backends are stepped by the worker's compute loop: `add` a sequence (its prompt is prefilled on the
next step), `step` once to decode one more token for every sequence held, `remove` one that is done or
cancelled. A backend decides each sequence's end (an end-of-generation or stop token, or max_tokens); the
engine around it turns tokens into text, stop words and replies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple, Protocol

import numpy as np


class Sampling(NamedTuple):
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop_token_ids: tuple[int, ...]
    repetition_penalty: float | None


class StepOut(NamedTuple):
    """What one step gave a sequence: its new token ids, and why it ended ("stop" or "length") if it did."""

    seq_id: int
    tokens: list[int]
    finish: str | None = None


class Detokenizer(Protocol):
    def push(self, token_ids: list[int]) -> str:
        """Text of these new tokens (incomplete UTF-8 is held back until it completes)."""

    def flush(self) -> str:
        """What is still held back, at the end of the sequence."""


class LLMBackend(ABC):
    context_length: int
    chat_template: str | None = None  # the model's own (tokenizer / GGUF metadata)
    bos_token: str = ""
    eos_token: str = ""
    max_sequences: int = 1  # sequences one step decodes together

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """The prompt's token ids, as the engine would tokenize it itself (special tokens included)."""

    @abstractmethod
    def detokenizer(self) -> Detokenizer: ...

    @abstractmethod
    def add(self, seq_id: int, prompt_ids: list[int], sampling: Sampling) -> None:
        """Hold a new sequence (at most max_sequences at once); the next step prefills it."""

    @abstractmethod
    def step(self) -> list[StepOut]:
        """One decode step for every sequence held; a sequence that ends is released by the backend itself."""

    @abstractmethod
    def remove(self, seq_id: int) -> None:
        """Release a sequence before its end (cancelled, or cut by a stop word)."""

    @abstractmethod
    def active(self) -> int:
        """Sequences held."""

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        raise NotImplementedError

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

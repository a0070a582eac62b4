"""The interface the instance's batchers call; each backend module (one per engine library) implements it, and
its `load(ctx: LoadContext)` makes the backend and the batcher on it.

Generation backends are stepped by the process's compute loop: `add` a sequence (its prompt is prefilled on the
next step), `step` once to decode one more token for every sequence held, `remove` one that is done or
cancelled. A backend decides each sequence's end (an end-of-generation or stop token, or max_tokens); the
batcher around it turns tokens into text, stop words and replies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import numpy as np

from zinfer.shared import engines
from zinfer.shared import protocol as p
from zinfer.shared.errors import InvalidRequest
from zinfer.shared.payloads import LoraAdapter


@dataclass(frozen=True)
class LoadContext:
    """What a backend's load() is given: the launch, the engine it runs on, the checked files, where it runs, and
    what its batcher needs (the queue's limit, how it wakes the compute loop)."""

    launch: p.LoadInstance
    engine: engines.EngineInfo
    path: str
    device: str  # "cpu" or "cuda:N"
    threads: int | None  # CPU threads for the engine (None: its default)
    trust_remote_code: bool  # this worker's settings allow the model's own code
    queue_limit: int  # requests its batcher holds at most
    wake: Callable[[], None]  # a new request for the compute loop
    template_timeout_s: float
    llama_cpp_amx: bool = False
    projector: str | None = None  # a GGUF vision model's multimodal projector file (llama.cpp's mmproj)

    @property
    def uid(self) -> str:
        return self.launch.model_uid

    def option(self, name: str):
        """The launch's value for one of the engine's options, else the engine's default."""
        return engines.option(self.engine, self.launch.options, name)


class Sampling(NamedTuple):
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop_token_ids: tuple[int, ...]
    repetition_penalty: float | None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # how many top alternatives each token's logprob comes with; None: no logprobs
    min_tokens: int = 0  # end tokens are held off until this many tokens
    ignore_eos: bool = False  # end-of-generation tokens do not end it (max_tokens and stop tokens still do)
    matcher: Any = None  # the sequence's grammar.Matcher: the output must follow its grammar
    adapter: str | None = None  # the LoRA adapter that decodes it (None: the base model)
    adapter_scale: float | None = None  # its strength for this request (None: the adapter's launch scale)
    media: Any = None  # what the prompt's images became for the model (encode_images), used by its prefill


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model (before any sampling change), and the top alternatives."""

    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


class StepOut(NamedTuple):
    """What one step gave a sequence: its new token ids, and why it ended ("stop" or "length") if it did."""

    seq_id: int
    tokens: list[int]
    finish: str | None = None
    logprobs: TokenLogprob | None = None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax of a row of logits, as llama-cpp-python computes it (Llama.logits_to_logprobs)."""
    top = np.amax(logits)
    shifted = np.subtract(logits, top if np.isfinite(top) else 0, dtype=np.single)
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted)))


def token_logprob(row: np.ndarray, token: int, k: int) -> TokenLogprob:
    """The logprob of `token` and the k most likely tokens from a row of log-probabilities."""
    if k > 0:
        best = np.argpartition(-row, k - 1)[:k] if k < row.shape[0] else np.arange(row.shape[0])
        best = best[np.argsort(-row[best], kind="stable")]
        top = [(int(i), float(row[i])) for i in best]
    else:
        top = []
    return TokenLogprob(float(row[token]), top)


class Detokenizer(Protocol):
    def push(self, token_ids: list[int]) -> str:
        """Text of these new tokens (incomplete UTF-8 is held back until it completes)."""

    def flush(self) -> str:
        """What is still held back, at the end of the sequence."""


class LLMBackend(ABC):
    engine: str  # Xinference's name for it: "transformers", "llama.cpp"
    context_length: int
    chat_template: str | dict[str, str] | None = None  # the model's own (tokenizer files / GGUF metadata)
    bos_token: str = ""
    eos_token: str = ""
    # what a chat template sees besides the messages (the tokenizer's special tokens, as transformers passes them)
    template_vars: dict = {}
    grammars: Any = None  # its grammar.Grammars: the vocabulary for constrained decoding, compiled grammars
    max_sequences: int = 1  # sequences one step decodes together

    def unsupported(self, sampling: Sampling) -> str | None:
        """The request field this engine cannot honour for `sampling` (named in the refusal), or None."""
        return None

    def token_text(self, token_id: int) -> str:
        """One token's text on its own (for logprobs)."""
        raise NotImplementedError

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """The prompt's token ids, as the engine would tokenize it itself (special tokens included). Called on the
        batcher's preparing thread, beside a step on the compute loop."""

    vision = False  # the model takes images (an image processor and a vision tower): encode_images
    media_anywhere = False  # encode_images may run on the preparing thread (else on the compute loop, between steps)
    no_vision = "found no image processor and vision tower in its files"  # why not, said when images come
    # The text a chat's image part becomes before its template renders (llama.cpp's media marker), for an engine
    # that places images itself; None: the template sees image parts ({"type": "image"}) and places them.
    media_marker: str | None = None

    def encode_images(self, text: str, images: list) -> tuple[list[int], Any]:
        """(the prompt's token ids with each image's tokens in its place, what the prefill needs of the images:
        Sampling.media) for a prompt whose template put one image token per image of `images` (ImageParts)."""
        raise NotImplementedError

    @abstractmethod
    def detokenizer(self) -> Detokenizer: ...

    @abstractmethod
    def add(self, seq_id: int, prompt_ids: list[int], sampling: Sampling, same_prompt_as: int | None = None) -> None:
        """Hold a new sequence (at most max_sequences at once); the next step prefills it. `same_prompt_as`: an
        earlier sequence of the same request (another choice of `n`: the same prompt and images), whose prefill
        the engine may copy instead of computing it again."""

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

    # LoRA adapters (on the compute loop, between steps): each sequence names its own (Sampling.adapter)
    adapters: Mapping[str, LoraAdapter] = MappingProxyType({})  # loaded, by name (backends that take them own one)

    def add_adapter(self, lora: LoraAdapter, path: str) -> None:
        """Load an adapter whose files were checked against the model (services/worker/adapters.py)."""
        raise InvalidRequest(f"the {self.engine} engine takes no LoRA adapters", field="peft_model_config")

    def drop_adapter(self, name: str) -> None:
        """Unload an adapter no sequence uses any more."""
        raise KeyError(name)

    def close(self) -> None:  # noqa: B027 - engines with nothing to release keep this
        return None


class EmbeddingBackend(ABC):
    """sentence-transformers' models (SentenceTransformer, CrossEncoder): `model` on `device`; `torch` the module."""

    dimensions: int
    max_tokens: int
    normalized: bool = False  # its vectors are unit length: a request may ask for fewer dimensions

    @abstractmethod
    def token_counts(self, texts: list[str]) -> list[int]: ...

    @abstractmethod
    def encode(self, texts: list[str]) -> np.ndarray: ...

    def close(self) -> None:
        """Free the model (and, on a GPU, the memory torch caches for it)."""
        model = getattr(self, "model", None)
        if model is None:
            return
        self.model = None
        del model
        if getattr(self, "device", "cpu").startswith("cuda"):
            import gc

            gc.collect()
            self.torch.cuda.empty_cache()

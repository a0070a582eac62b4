"""sentence-transformers' CrossEncoder engine for the `rerank` model type (Xinference's `normal` rerankers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from zinfer.services.worker.instance.backends.base import EmbeddingBackend, LoadContext
from zinfer.shared.errors import InvalidRequest

PREDICT_BATCH = 32

# Xinference decides an `unknown` rerank type from the tokenizer's class; the same table (without transformers'
# "Fast" suffix, which transformers 5 dropped from class names).
TYPE_OF_TOKENIZER = {"LlamaTokenizer": "LLM-based layerwise", "GemmaTokenizer": "LLM-based",
                     "XLMRobertaTokenizer": "normal"}


def detect_type(path: str) -> str:
    """The rerank type of the model at `path`, from its tokenizer's class as tokenizer_config.json names it;
    `normal` when it names none that the table knows (as Xinference falls back)."""
    try:
        config = json.loads((Path(path) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return "normal"
    name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    return TYPE_OF_TOKENIZER.get(name, "normal")


class CrossEncoderBackend(EmbeddingBackend):
    """Scores (query, document) pairs: `encode` gives one float32 score per pair, as CrossEncoder.predict does
    (with the model's activation: a sigmoid for one-label models)."""

    dimensions = 1

    def __init__(self, path: str, device: str, max_tokens: int | None, trust_remote_code: bool = False):
        import torch
        from sentence_transformers import CrossEncoder

        self.torch = torch
        self.device = device
        self.model = CrossEncoder(path, device=device, trust_remote_code=trust_remote_code, max_length=max_tokens)
        if self.model.num_labels != 1:
            labels = self.model.num_labels
            self.close()
            raise InvalidRequest(f"the model at {path} has {labels} output labels; a reranker gives one score per "
                                 "pair (num_labels 1)", field="model_uri")
        if device.startswith("cuda"):
            self.model.half()
        self.model.eval()
        self.max_tokens = int(self.model.max_length)
        self.tokenizer = self.model.tokenizer
        self._counter = self._rust_counter()

    def _slow_counts(self, pairs: list[tuple[str, str]]) -> list[int]:
        enc = self.tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation=True,
                             max_length=self.max_tokens, return_attention_mask=False, verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def _rust_counter(self):
        """A copy of the fast tokenizer that counts a pair's tokens as the model sees them (truncated to
        max_tokens), checked against the transformers call; None where they differ."""
        rust = getattr(self.tokenizer, "backend_tokenizer", None)
        if rust is None:
            return None
        from tokenizers import Tokenizer

        counter = Tokenizer.from_str(rust.to_str())
        try:
            counter.enable_truncation(self.max_tokens, strategy="longest_first")
        except Exception:
            return None
        counter.no_padding()
        probe = [("what is a whale?", "The blue whale is the largest animal."), ("déjà vu", ""),
                 ("whales " * self.max_tokens, "fish " * self.max_tokens), ("q", "doc " * (2 * self.max_tokens))]
        got = [len(e.ids) for e in counter.encode_batch(probe, add_special_tokens=True)]
        return counter if got == self._slow_counts(probe) else None

    def token_counts(self, pairs: list[tuple[str, str]]) -> list[int]:
        if self._counter is None:
            return self._slow_counts(pairs)
        return [len(e.ids) for e in self._counter.encode_batch_fast(pairs, add_special_tokens=True)]

    def encode(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        # predict() sorts the pairs by length into forward passes of batch_size: 32, its default. One pass over a
        # whole step's pairs (100 pairs, one padded batch) was 10% slower on this CPU (633 against 572 ms for
        # 1 x 100 MiniLM-sized pairs): padding to the longest costs more than the extra passes.
        scores = self.model.predict(pairs, batch_size=PREDICT_BATCH, convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(scores, dtype=np.float32).reshape(len(pairs))


def load(ctx: LoadContext):
    """The rerank engine of an instance (shared/engines.py): a CrossEncoder for a `normal` model (an `unknown`
    one is told by its tokenizer, as Xinference does), and the batching engine on it."""
    from zinfer.services.worker.instance.rerank_batcher import RerankBatcher

    family = ctx.launch.rerank
    kind = detect_type(ctx.path) if family.type == "unknown" else family.type
    if kind != "normal":
        raise InvalidRequest(f"type {kind!r}" + (" (told by its tokenizer; the registration says unknown)"
                                                 if family.type == "unknown" else "")
                             + ": zinfer runs rerank models of type normal only, on CrossEncoder", field="type")
    backend = CrossEncoderBackend(ctx.path, ctx.device, family.max_tokens, ctx.trust_remote_code)
    return backend, RerankBatcher(ctx.uid, backend, ctx.wake, ctx.queue_limit,
                                  max_batch_size=ctx.option("max_batch_size"),
                                  max_batch_tokens=ctx.option("max_batch_tokens"), wait_ms=ctx.option("batch_wait_ms"))

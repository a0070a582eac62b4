"""sentence-transformers engine for the `embedding` model type."""

from __future__ import annotations

import numpy as np

from services.worker.backends.base import EmbeddingBackend


class SentenceTransformersBackend(EmbeddingBackend):
    def __init__(self, path: str, device: str, max_tokens: int, trust_remote_code: bool = False):
        import torch
        from sentence_transformers import SentenceTransformer

        self.torch = torch
        self.device = device
        self.model = SentenceTransformer(path, device=device, trust_remote_code=trust_remote_code)
        if device.startswith("cuda"):
            self.model.half()
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimensions = int(dim())
        self.max_tokens = max_tokens
        self.tokenizer = self.model.tokenizer
        self._counter = self._rust_counter()

    def _rust_counter(self):
        """A copy of a fast tokenizer's Rust tokenizer that counts tokens, or None (a slow tokenizer).

        Counting through the transformers tokenizer costs 20 us per sentence when warm and 170-190 us right after
        an encode has flushed the caches (MiniLM, this machine), which is when the worker counts; the Rust call
        alone costs half. It is a copy because encode() leaves truncation and padding switched on in the
        tokenizer it shares; the copy has neither, and must count as the transformers call does (checked here)."""
        rust = getattr(self.tokenizer, "backend_tokenizer", None)
        if rust is None:
            return None
        from tokenizers import Tokenizer

        counter = Tokenizer.from_str(rust.to_str())
        counter.no_truncation()
        counter.no_padding()
        probe = ["Hello, world!", "zinfer counts tokens: 12,345 déjà vu", " leading and  double  spaces "]
        if self._slow_counts(probe) != [len(e.ids) for e in counter.encode_batch(probe, add_special_tokens=True)]:
            return None
        return counter

    def _slow_counts(self, texts: list[str]) -> list[int]:
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=False, return_attention_mask=False,
                             verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def token_counts(self, texts: list[str]) -> list[int]:
        if self._counter is None:
            return self._slow_counts(texts)
        return [len(e.ids) for e in self._counter.encode_batch_fast(texts, add_special_tokens=True)]

    def encode(self, texts: list[str]) -> np.ndarray:
        out = self.model.encode(texts, convert_to_numpy=True,
                                show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)

    def close(self) -> None:
        del self.model
        if self.device.startswith("cuda"):
            import gc

            gc.collect()
            self.torch.cuda.empty_cache()

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

    def token_counts(self, texts: list[str]) -> list[int]:
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=False, return_attention_mask=False,
                             verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

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

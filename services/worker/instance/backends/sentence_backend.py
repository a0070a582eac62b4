"""sentence-transformers engine for the `embedding` model type."""

from __future__ import annotations

import numpy as np

from zinfer.services.worker.instance.backends.base import EmbeddingBackend, LoadContext

# Batches up to sentence-transformers' default batch_size run as one forward pass here (encode() would run them
# as one batch too); bigger ones go through encode(), which sorts texts by length into batches of 32.
DIRECT_MAX = 32


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
        # Unit-length vectors (the model ends in a Normalize module): a request may take fewer dimensions, cut
        # and renormalised, and cosine similarity keeps its meaning.
        self.normalized = any(type(module).__name__ == "Normalize" for module in self.model)
        self.max_tokens = max_tokens
        self.tokenizer = self.model.tokenizer
        self._counter = self._rust_counter()
        self.model.eval()  # encode() does this on every call; the direct path relies on it once
        self._featurizer = self._rust_featurizer()

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

    def _rust_featurizer(self):
        """(tokenizer, constant entries) that build the model's input features straight from a copy of the fast
        tokenizer, or None where they would differ from the model's own preprocess().

        One sentence through encode() costs 0.5-1.0 ms more than the same forward pass called directly (MiniLM,
        this machine: 14.1 against 13.6 ms, three runs): argument checks, sorting by length, preprocess() through
        the transformers tokenizer (160 us for one short text, against 16 us for the Rust call), a stack and a
        reorder. Small batches take the direct path; the features are checked here against preprocess() on texts
        of every kind, including one over max_seq_length."""
        rust = getattr(self.tokenizer, "backend_tokenizer", None)
        limit = getattr(self.model, "max_seq_length", None)
        if rust is None or not limit or not hasattr(self.model, "preprocess"):
            return None
        from tokenizers import Tokenizer

        tok = self.tokenizer
        fast = Tokenizer.from_str(rust.to_str())
        try:
            fast.enable_truncation(int(limit), direction=tok.truncation_side)
            fast.enable_padding(direction=tok.padding_side, pad_id=tok.pad_token_id, pad_type_id=tok.pad_token_type_id,
                                pad_token=tok.pad_token)
        except Exception:  # no pad token, or an option this tokenizer does not take
            return None
        probe = ["Hello, world!", "zinfer counts tokens: 12,345 déjà vu", " leading and  double  spaces ", "",
                 "whales " * (int(limit) + 8), "🐋 naïve café"]
        expected = self.model.preprocess(probe)
        constants = {k: v for k, v in expected.items() if not isinstance(v, self.torch.Tensor)}
        featurizer = (fast, constants)
        got = self._features(featurizer, probe)
        same = set(got) == set(expected) and all(
            self.torch.equal(got[k], v) if isinstance(v, self.torch.Tensor) else got[k] == v
            for k, v in expected.items())
        return featurizer if same else None

    def _features(self, featurizer, texts: list[str]) -> dict:
        fast, constants = featurizer
        encodings = fast.encode_batch_fast(texts, add_special_tokens=True)
        features = dict(constants)
        features["input_ids"] = self.torch.tensor([e.ids for e in encodings], dtype=self.torch.int64)
        features["token_type_ids"] = self.torch.tensor([e.type_ids for e in encodings], dtype=self.torch.int64)
        features["attention_mask"] = self.torch.tensor([e.attention_mask for e in encodings], dtype=self.torch.int64)
        return features

    def _slow_counts(self, texts: list[str]) -> list[int]:
        enc = self.tokenizer(texts, add_special_tokens=True, truncation=False, return_attention_mask=False,
                             verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def token_counts(self, texts: list[str]) -> list[int]:
        if self._counter is None:
            return self._slow_counts(texts)
        return [len(e.ids) for e in self._counter.encode_batch_fast(texts, add_special_tokens=True)]

    def encode(self, texts: list[str]) -> np.ndarray:
        if self._featurizer is not None and len(texts) <= DIRECT_MAX:
            return self._encode_direct(texts)
        out = self.model.encode(texts, convert_to_numpy=True,
                                show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _encode_direct(self, texts: list[str]) -> np.ndarray:
        """What encode() does for one batch of its own (at most its batch_size, 32, texts): features, the forward
        pass, the sentence embedding; without its per-call overhead."""
        torch = self.torch
        with torch.inference_mode():
            features = self._features(self._featurizer, texts)
            if self.model.device.type != "cpu":
                features = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v
                            for k, v in features.items()}
            out = self.model(features)["sentence_embedding"]
            if self.model.truncate_dim:
                out = out[:, :self.model.truncate_dim]
            return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)


def load(ctx: LoadContext):
    """The sentence-transformers engine of an instance (shared/engines.py): the backend, checked against the
    registration's dimensions, and the batching embedding engine on it."""
    from zinfer.services.worker.instance.embed_batcher import EmbeddingBatcher
    from zinfer.shared.errors import InvalidRequest

    family = ctx.launch.embedding
    backend = SentenceTransformersBackend(ctx.path, ctx.device, family.max_tokens, ctx.trust_remote_code)
    if backend.dimensions != family.dimensions:
        backend.close()
        raise InvalidRequest(f"the model at {ctx.path} makes {backend.dimensions}-dimensional embeddings; the "
                             f"registration says dimensions={family.dimensions}", field="dimensions")
    return backend, EmbeddingBatcher(ctx.uid, backend, ctx.wake, ctx.queue_limit,
                                     max_batch_size=ctx.option("max_batch_size"),
                                     max_batch_tokens=ctx.option("max_batch_tokens"),
                                     wait_ms=ctx.option("batch_wait_ms"))

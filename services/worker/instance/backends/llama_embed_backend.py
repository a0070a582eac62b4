"""llama.cpp engine for the `embedding` model type: GGUF embedding models (BERT-style encoders, and decoders with
a pooling of their own) through llama-cpp-python's low-level API.

One step embeds many texts in one llama_decode, each its own sequence (positions from 0), pooled as the file's
metadata says (mean, CLS, last token) and normalised to unit length, as sentence-transformers' Normalize
module and llama.cpp's server do. The batching across requests is the EmbeddingBatcher's (embed_batcher.py),
the same as for sentence-transformers.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from zinfer.services.worker.instance.backends.base import EmbeddingBackend, LoadContext
from zinfer.shared.errors import InvalidRequest

# Sequences one decode may hold (llama.cpp's own limit is 256): bigger requests take several steps.
MAX_SEQUENCES = 256


class LlamaCppEmbeddingBackend(EmbeddingBackend):
    normalized = True

    def __init__(self, path: str, device: str, max_tokens: int, batch_tokens: int, batch_size: int,
                 n_threads: int | None = None):
        import llama_cpp
        from llama_cpp import _internals as internals
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        self.lib = llama_cpp
        self.device = device
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = -1 if device.startswith("cuda") else 0
        self.model = internals.LlamaModel(path_model=path, params=mparams, verbose=False)
        model = self.model.model
        trained = llama_cpp.llama_model_n_ctx_train(model)
        self.max_tokens = min(max_tokens, trained) if trained > 0 else max_tokens
        # Every text of a step in one micro-batch: an encoder attends over its whole input at once.
        self.batch_tokens = max(self.max_tokens, batch_tokens)
        self.max_sequences = max(1, min(batch_size, MAX_SEQUENCES))
        cparams = llama_cpp.llama_context_default_params()
        cparams.embeddings = True
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = self.batch_tokens
        cparams.n_seq_max = self.max_sequences
        cparams.kv_unified = True  # a decoder-based model's sequences share the cache, cleared every step
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cpus = os.cpu_count() or 1
        cparams.n_threads = n_threads or max(cpus // 2, 1)
        cparams.n_threads_batch = n_threads or cpus
        self.ctx = internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        self.pooling = llama_cpp.llama_pooling_type(self.ctx.ctx)
        if self.pooling in (llama_cpp.LLAMA_POOLING_TYPE_NONE, llama_cpp.LLAMA_POOLING_TYPE_RANK):
            kind = "no pooling" if self.pooling == llama_cpp.LLAMA_POOLING_TYPE_NONE else "rank pooling (a reranker)"
            self.close()
            raise InvalidRequest(f"the GGUF file at {path} declares {kind} ({self._pooling_key()}): it makes no "
                                 "sentence embeddings", field="model_format")
        self.dimensions = int(llama_cpp.llama_model_n_embd(model))
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.batch = llama_cpp.llama_batch_init(self.batch_tokens, 0, 1)
        self._get_seq = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)(
            ("llama_get_embeddings_seq", llama_cpp.llama_cpp._lib))
        # Tokens token_counts() made (the engine counts each request's texts before a step), which the step's
        # encode() takes instead of tokenizing again; emptied by every encode().
        self._tokens: dict[str, list[int]] = {}

    def _pooling_key(self) -> str:
        arch = self.model.metadata().get("general.architecture", "?")
        return f"{arch}.pooling_type"

    def _tokenize(self, text: str) -> list[int]:
        # As llama-cpp-python's embed(): the model's BOS/CLS and SEP/EOS as its vocabulary asks, no special parsing.
        return self.model.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def token_counts(self, texts: list[str]) -> list[int]:
        tokens = self._tokens
        for text in texts:
            if text not in tokens:
                tokens[text] = self._tokenize(text)
        return [len(tokens[t]) for t in texts]

    def encode(self, texts: list[str]) -> np.ndarray:
        known, self._tokens = self._tokens, {}
        rows = [known.get(t) or self._tokenize(t) for t in texts]
        out = np.empty((len(rows), self.dimensions), dtype=np.float32)
        start = 0
        while start < len(rows):
            end, used = start, 0
            while end < len(rows) and end - start < self.max_sequences and (
                    end == start or used + len(rows[end]) <= self.batch_tokens):
                used += len(rows[end])
                end += 1
            self._decode(rows[start:end], out[start:end])
            start = end
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1, norms)

    def _decode(self, rows: list[list[int]], out: np.ndarray) -> None:
        lib, b = self.lib, self.batch
        n = 0
        for seq, ids in enumerate(rows):  # each text fits: the engine refused any over max_tokens <= batch_tokens
            for pos, token in enumerate(ids):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = token, pos, 1, True
                b.seq_id[n][0] = seq
                n += 1
        b.n_tokens = n
        if self.memory:
            lib.llama_memory_clear(self.memory, True)
        status = lib.llama_decode(self.ctx.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status}) embedding {len(rows)} texts of {n} tokens")
        for seq in range(len(rows)):
            address = self._get_seq(self.ctx.ctx, seq)
            if not address:
                raise RuntimeError(f"llama.cpp gave no embedding for sequence {seq}")
            out[seq] = np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_float)),
                                             shape=(self.dimensions,))

    def close(self) -> None:
        batch, self.batch = getattr(self, "batch", None), None
        if batch is not None:
            self.lib.llama_batch_free(batch)
        for part in ("ctx", "model"):
            held = getattr(self, part, None)
            if held is not None:
                setattr(self, part, None)
                held.close()


def load(ctx: LoadContext):
    """The llama.cpp embedding engine of an instance (shared/engines.py): the backend, checked against the
    registration's dimensions, and the batching embedding engine on it. llama.cpp runs no model code."""
    from zinfer.services.worker.instance.embed_batcher import EmbeddingBatcher

    family = ctx.launch.embedding
    backend = LlamaCppEmbeddingBackend(ctx.path, ctx.device, family.max_tokens, ctx.option("max_batch_tokens"),
                                       ctx.option("max_batch_size"),
                                       n_threads=ctx.launch.options.n_threads or ctx.threads or None)
    if backend.dimensions != family.dimensions:
        backend.close()
        raise InvalidRequest(f"the model at {ctx.path} makes {backend.dimensions}-dimensional embeddings; the "
                             f"registration says dimensions={family.dimensions}", field="dimensions")
    return backend, EmbeddingBatcher(ctx.uid, backend, ctx.wake, ctx.queue_limit,
                                     max_batch_size=backend.max_sequences, max_batch_tokens=backend.batch_tokens,
                                     wait_ms=ctx.option("batch_wait_ms"))

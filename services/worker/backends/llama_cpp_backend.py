"""llama.cpp engine (llama-cpp-python) for `ggufv2` specs. Single-sequence: requests queue fairly."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from services.worker.backends.base import FairLock, LLMBackend, Sampling, Step


class LlamaCppBackend(LLMBackend):
    def __init__(self, path: str, device: str, context_length: int, n_threads: int | None = None,
                 embedding: bool = False):
        from llama_cpp import Llama

        self._Llama = Llama
        self.path = path
        self.n_gpu_layers = -1 if device.startswith("cuda") else 0
        self.n_threads = n_threads
        self.context_length = context_length
        self.llm = Llama(model_path=path, n_ctx=context_length, n_gpu_layers=self.n_gpu_layers,
                         n_threads=n_threads, verbose=False)
        meta = self.llm.metadata or {}
        self.chat_template = meta.get("tokenizer.chat_template")
        self.bos_token = self._token_text(self.llm.token_bos())
        self.eos_token = self._token_text(self.llm.token_eos())
        self.lock = FairLock()
        self._embedder = None
        self._want_embedding = embedding

    def _token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="ignore")

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=self.llm._model.add_bos_token(), special=True))

    def queue_depth(self) -> int:
        return self.lock.depth

    def completion_kwargs(self, sampling: Sampling) -> dict:
        kw: dict = {"max_tokens": sampling.max_tokens, "temperature": sampling.temperature}
        for name, value in (("top_p", sampling.top_p), ("top_k", sampling.top_k), ("seed", sampling.seed),
                            ("repeat_penalty", sampling.repetition_penalty)):
            if value is not None:
                kw[name] = value
        if sampling.stop_token_ids:
            kw["stop"] = [t for t in (self._token_text(i) for i in sampling.stop_token_ids) if t]
        return kw

    def stream(self, prompt: str, sampling: Sampling, cancelled: threading.Event) -> Iterator[Step]:
        kwargs = self.completion_kwargs(sampling)
        with self.lock:
            chunks = self.llm.create_completion(prompt, stream=True, **kwargs)
            try:
                for chunk in chunks:
                    if cancelled.is_set():
                        return
                    choice = chunk["choices"][0]
                    yield Step(choice["text"], 1 if choice["finish_reason"] is None else 0,
                               choice["finish_reason"])
            finally:
                chunks.close()

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        with self.lock:
            if self._embedder is None:  # llama.cpp embeds only from a context made for it
                self._embedder = self._Llama(model_path=self.path, n_ctx=self.context_length, embedding=True,
                                             n_gpu_layers=self.n_gpu_layers, n_threads=self.n_threads,
                                             verbose=False)
            result = self._embedder.create_embedding(texts)
        vectors = np.asarray([d["embedding"] for d in result["data"]], dtype=np.float32)
        if vectors.ndim == 3:  # per-token embeddings (no pooling in the file): mean-pool them
            vectors = vectors.mean(axis=1)
        return vectors, int(result["usage"]["prompt_tokens"])

    def close(self) -> None:
        for llm in (self.llm, self._embedder):
            if llm is not None:
                llm.close()

"""llama.cpp engine (llama-cpp-python) for `ggufv2` specs. Single-sequence: requests queue fairly."""

from __future__ import annotations

import codecs
import random
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

    def tokenize(self, prompt: str) -> list[int]:
        """The prompt as create_completion tokenizes it: BOS/EOS as the vocabulary asks, special tokens parsed."""
        model = self.llm._model
        bos = model.token_cls() if model.token_cls() != -1 else self.llm.token_bos()
        head = [bos] if model.add_bos_token() and bos != -1 else []
        sep = model.token_sep()
        tail = [sep if sep != -1 else self.llm.token_eos()] if (model.add_eos_token() or sep != -1) else []
        return head + self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) + tail

    def queue_depth(self) -> int:
        return self.lock.depth

    def stream(self, prompt_ids: list[int], sampling: Sampling, cancelled: threading.Event) -> Iterator[Step]:
        """Token by token with llama.cpp's own sampler, as create_completion samples (same defaults, seed and
        end-of-generation tokens), but detokenizing each token once: create_completion(stream=True)
        re-detokenizes the whole completion per token, which grows quadratically (minutes for 6k tokens)."""
        import llama_cpp

        llm = self.llm
        stop_ids = set(sampling.stop_token_ids)
        vocab = llm._model.vocab
        with self.lock:
            llm.set_seed(sampling.seed if sampling.seed is not None
                         else random.Random(llm._seed).randint(0, 2**32))
            decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
            n, finish = 0, "length"
            generator = llm.generate(
                prompt_ids, top_k=40 if sampling.top_k is None else sampling.top_k,
                top_p=0.95 if sampling.top_p is None else sampling.top_p, min_p=0.05, typical_p=1.0,
                temp=sampling.temperature,
                repeat_penalty=1.0 if sampling.repetition_penalty is None else sampling.repetition_penalty)
            try:
                for token in generator:
                    if cancelled.is_set():
                        return
                    if llama_cpp.llama_vocab_is_eog(vocab, token) or token in stop_ids:
                        finish = "stop"
                        break
                    n += 1
                    yield Step(decoder.decode(llm.detokenize([token])), 1)
                    if n >= sampling.max_tokens:
                        break
            finally:
                generator.close()
            yield Step(decoder.decode(b"", final=True), 0, finish)

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        with self.lock:
            if self._embedder is None:  # llama.cpp embeds only from a context made for it
                from llama_cpp import LLAMA_POOLING_TYPE_MEAN

                # Mean pooling, as the transformers backend does (a file may declare no pooling of its own).
                self._embedder = self._Llama(model_path=self.path, n_ctx=self.context_length, embedding=True,
                                             pooling_type=LLAMA_POOLING_TYPE_MEAN, n_gpu_layers=self.n_gpu_layers,
                                             n_threads=self.n_threads, verbose=False)
            result = self._embedder.create_embedding(texts)
        vectors = np.asarray([d["embedding"] for d in result["data"]], dtype=np.float32)
        return vectors, int(result["usage"]["prompt_tokens"])

    def close(self) -> None:
        for llm in (self.llm, self._embedder):
            if llm is not None:
                llm.close()

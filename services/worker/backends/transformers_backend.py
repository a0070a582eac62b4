"""transformers engine for `pytorch` specs: AutoTokenizer + AutoModelForCausalLM."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import numpy as np

from services.worker.backends.base import LLMBackend, Sampling, Step, finish_reason
from shared.errors import InvalidRequest

_seed_lock = threading.Lock()


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self.emitted = ""

    def push(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        new_text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            self.emitted += delta
            return delta
        return ""

    def flush(self) -> str:
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        rest = full[len(self.emitted):] if full.startswith(self.emitted) else ""
        self.emitted += rest
        return rest


class _Cancelled(Exception):
    """Raised from the streamer to end a generate() whose request was cancelled."""


class _TokenBuffer:
    """transformers' streamer protocol (put gets the prompt first, then each new token), buffering ids for
    the consumer and waking it at most every WAKE_S: a wake-up per token costs more than the token on a CPU.
    Raising from put() is how a cancelled request stops generate() between two decode steps."""

    WAKE_S = 0.002

    def __init__(self, cancelled: threading.Event, stop: threading.Event):
        self.cancelled, self.stop = cancelled, stop
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.ids: list[int] = []
        self.done = False
        self.prompt_seen = False
        self.last_wake = 0.0

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.cancelled.is_set() or self.stop.is_set():
            raise _Cancelled
        with self.lock:
            self.ids.extend(value.reshape(-1).tolist())
        now = time.monotonic()
        if now - self.last_wake >= self.WAKE_S:
            self.last_wake = now
            self.ready.set()

    def end(self):
        self.done = True
        self.ready.set()

    def take(self) -> tuple[list[int], bool]:
        self.ready.wait()
        self.ready.clear()
        with self.lock:
            ids, self.ids = self.ids, []
        return ids, self.done and not self.ids


class TransformersBackend(LLMBackend):
    def __init__(self, path: str, device: str, quantization: str, context_length: int,
                 trust_remote_code: bool = False, continuous_batching: bool = True, run_on=None,
                 fast_decode: bool = True, max_sequences: int = 64):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device
        kwargs: dict = {"trust_remote_code": trust_remote_code}
        if quantization in ("4-bit", "8-bit"):
            if not device.startswith("cuda"):
                raise InvalidRequest(f"quantization {quantization!r} needs a GPU (bitsandbytes); "
                                     "launch with quantization 'none' on the CPU", field="quantization")
            try:
                import bitsandbytes  # noqa: F401
                from transformers import BitsAndBytesConfig
            except ImportError:
                raise InvalidRequest(f"quantization {quantization!r} needs the bitsandbytes package",
                                     field="quantization") from None
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=quantization == "4-bit", load_in_8bit=quantization == "8-bit")
            kwargs["device_map"] = device
        dtype = torch.float32
        if device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        if "device_map" not in kwargs:
            self.model.to(device)
        self.model.eval()
        self.context_length = context_length
        self.chat_template = getattr(self.tokenizer, "chat_template", None)
        self.bos_token = self.tokenizer.bos_token or ""
        self.eos_token = self.tokenizer.eos_token or ""
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (
            self.eos_ids[0] if self.eos_ids else 0)
        self.batcher = ContinuousBatcher(self, max_sequences) if continuous_batching else None
        # On a GPU, plain generate() decodes with a static KV cache, which transformers compiles with CUDA
        # graphs; launch with fast_decode=false to turn it off. Unmeasured here: no GPU in this project's CI.
        self.fast_decode = fast_decode and device.startswith("cuda") and quantization == "none"
        # Where plain generate() runs: given a submit(fn) -> Future (the worker's main thread), else a thread.
        self.run_on = run_on or _in_thread

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True).input_ids

    def generate_kwargs(self, sampling: Sampling) -> dict:
        kw: dict = {"max_new_tokens": sampling.max_tokens, "pad_token_id": self.pad_id,
                    "eos_token_id": list(dict.fromkeys(self.eos_ids + sampling.stop_token_ids))}
        if sampling.temperature and sampling.temperature > 0:
            kw.update(do_sample=True, temperature=sampling.temperature)
            if sampling.top_p is not None:
                kw["top_p"] = sampling.top_p
            if sampling.top_k is not None:
                kw["top_k"] = sampling.top_k
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.repetition_penalty is not None:
            kw["repetition_penalty"] = sampling.repetition_penalty
        if self.fast_decode:
            kw["cache_implementation"] = "static"
        return kw

    def stream(self, prompt_ids: list[int], sampling: Sampling, cancelled: threading.Event) -> Iterator[Step]:
        """With continuous batching on (a launch option; the default on a GPU), greedy requests share the batch
        and sampled ones run as plain `generate`; with it off, every request runs as plain `generate`, one at a
        time on the worker's main thread. A lone greedy request takes the batch path too: a plain `generate`
        running beside the batch on one model thrashed the CPU's cores (16 streams: 208 tokens/s)."""
        if self.batcher is not None and not sampling.temperature and sampling.repetition_penalty is None:
            return self.batcher.stream(prompt_ids, sampling, cancelled)
        return self._stream_plain(prompt_ids, sampling, cancelled)

    def _stream_plain(self, prompt_ids: list[int], sampling: Sampling, cancelled: threading.Event) -> Iterator[Step]:
        """One `generate` call, run where `run_on` says (the worker's main thread: one at a time, and torch is
        faster there), streaming its tokens to this thread."""
        torch = self.torch
        input_ids = torch.tensor([prompt_ids], device=self.device)
        enc = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        stop = threading.Event()
        buffer = _TokenBuffer(cancelled, stop)
        kwargs = self.generate_kwargs(sampling)

        def run():
            try:
                with torch.inference_mode():
                    if sampling.seed is not None:
                        with _seed_lock:
                            torch.manual_seed(sampling.seed)
                    self.model.generate(**enc, streamer=buffer, **kwargs)
            except _Cancelled:
                pass
            finally:
                buffer.end()

        done = self.run_on(run)
        decoder = IncrementalDecoder(self.tokenizer)
        n, last, finished = 0, None, False
        try:
            while not finished:
                ids, finished = buffer.take()
                for token in ids:  # one step per token, so a stream can still send every token on its own
                    n += 1
                    last = token
                    yield Step(decoder.push([token]), 1)
            done.result()  # surfaces an error raised by generate
            yield Step(decoder.flush(), 0, finish_reason(last, kwargs["eos_token_id"], n, sampling.max_tokens))
        finally:
            stop.set()
            if not finished:
                done.result()

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        torch = self.torch
        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        with torch.inference_mode():
            out = self.model(**enc, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return pooled.float().cpu().numpy(), int(enc["attention_mask"].sum())

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        del self.model
        if self.device.startswith("cuda"):
            import gc

            gc.collect()
            self.torch.cuda.empty_cache()


def _in_thread(fn) -> Future:
    future: Future = Future()

    def target():
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, name="hf-generate", daemon=True).start()
    return future


class ContinuousBatcher:
    """transformers' continuous batching manager, shared by the concurrent greedy requests of one instance.

    New requests join between decode steps and finished ones leave; each keeps its own max_tokens and stop
    tokens. One dispatcher thread reads the manager's results and routes them to each request's queue (the
    manager's own per-request iterator re-queues other requests' results, which churns under load).
    """

    def __init__(self, backend: TransformersBackend, max_sequences: int = 64):
        self.backend = backend
        self.max_sequences = max_sequences
        self._manager = None
        self._lock = threading.Lock()
        self._routes: dict[str, queue.Queue] = {}
        self._ids = itertools.count()
        self._closing = threading.Event()

    def _start(self):
        with self._lock:
            if self._manager is None:
                from transformers import ContinuousBatchingConfig, GenerationConfig

                gen = GenerationConfig(do_sample=False, max_new_tokens=self.backend.context_length,
                                       eos_token_id=list(self.backend.eos_ids) or -1,
                                       pad_token_id=self.backend.pad_id)
                # Size the paged KV cache for max_sequences full contexts: left to itself, transformers takes 90%
                # of free memory (14 GB of this 24 GB CPU machine, 19 s to allocate, for a 2 MB model).
                page = 256
                blocks = self.max_sequences * -(-self.backend.context_length // page)
                manager = self.backend.model.init_continuous_batching(
                    generation_config=gen,
                    continuous_batching_config=ContinuousBatchingConfig(
                        auto_switch_to_flash=False,  # sdpa stays sdpa: plain generate can share the model
                        page_size=page, num_blocks=blocks, max_requests_per_batch=self.max_sequences,
                        max_batch_tokens=max(page, min(self.backend.context_length, 4096))))
                manager.start()
                self._manager = manager
                threading.Thread(target=self._dispatch, name="cb-dispatch", daemon=True).start()
            return self._manager

    def _dispatch(self) -> None:
        manager = self._manager
        while not self._closing.is_set():
            out = manager.get_result(timeout=0.1)
            if out is None:
                if manager.background_thread_status.fatal_error is not None:
                    error = manager.background_thread_status.fatal_error
                    for q in list(self._routes.values()):
                        q.put(RuntimeError(f"continuous batching stopped: {error}"))
                    return
                continue
            q = self._routes.get(out.request_id)
            if q is not None:
                q.put(out)

    def stream(self, input_ids: list[int], sampling: Sampling, cancelled: threading.Event) -> Iterator[Step]:
        manager = self._start()
        rid = f"zinfer-{next(self._ids)}"
        q: queue.Queue = queue.Queue()
        self._routes[rid] = q
        eos = list(dict.fromkeys(self.backend.eos_ids + sampling.stop_token_ids))
        manager.add_request(input_ids, request_id=rid, max_new_tokens=sampling.max_tokens, streaming=True,
                            eos_token_id=eos or -1)
        decoder = IncrementalDecoder(self.backend.tokenizer)
        seen, finished, last = 0, False, None
        try:
            while not finished:
                try:
                    out = q.get(timeout=0.05)
                except queue.Empty:
                    if cancelled.is_set():
                        return
                    continue
                while not q.empty():  # behind by a few steps: the latest output holds them all
                    later = q.get_nowait()
                    if isinstance(out, Exception) or (not isinstance(later, Exception) and out.error):
                        break
                    out = later
                if isinstance(out, Exception):
                    raise out
                if out.error:
                    raise RuntimeError(f"generation failed: {out.error}")
                new = list(out.generated_tokens[seen:])
                seen += len(new)
                finished = out.is_finished()
                if new:
                    last = new[-1]
                    yield Step(decoder.push(new), len(new))
                if cancelled.is_set():
                    return
            yield Step(decoder.flush(), 0, finish_reason(last, eos, seen, sampling.max_tokens))
        finally:
            self._routes.pop(rid, None)
            if not finished:
                manager.cancel_request(rid)

    def close(self) -> None:
        self._closing.set()
        if self._manager is not None:
            self._manager.stop(block=True)

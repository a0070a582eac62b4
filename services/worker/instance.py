"""One loaded model replica: builds its backend and turns requests into completion / embedding replies."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np

from services.worker import files, prompts
from services.worker.backends.base import EmbeddingBackend, LLMBackend, Sampling, Step
from shared import protocol as p
from shared.errors import Forbidden, InstanceNotReady, InvalidRequest, TooLarge

DEFAULT_MAX_TOKENS = 1024
DEFAULT_STREAM_INTERVAL_MS = 10.0  # tokens produced within this window travel as one chunk


def _stops(*groups) -> list[str]:
    out: list[str] = []
    for g in groups:
        if isinstance(g, str):
            g = [g]
        for s in g or ():
            if s and s not in out:
                out.append(s)
    return out


def apply_stops(steps: Iterator[Step], stops: list[str]) -> Iterator[Step]:
    """Cut the text at the first stop word (which is not returned), holding back possible stop prefixes."""
    if not stops:
        yield from steps
        return
    buffer = ""
    try:
        for step in steps:
            buffer += step.text
            cut = min((i for i in (buffer.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                yield Step(buffer[:cut], step.tokens, "stop")
                return
            if step.finish:
                yield Step(buffer, step.tokens, step.finish)
                return
            hold = max((k for s in stops for k in range(1, len(s)) if buffer.endswith(s[:k])), default=0)
            yield Step(buffer[:len(buffer) - hold], step.tokens)
            buffer = buffer[len(buffer) - hold:]
    finally:
        close = getattr(steps, "close", None)
        if close:
            close()


def _usage(prompt_tokens: int):
    """usage(n) -> the Usage of a reply whose completion has n tokens so far."""
    return lambda n: p.Usage(prompt_tokens=prompt_tokens, completion_tokens=n, total_tokens=prompt_tokens + n)


def _collect(steps: Iterator[Step]) -> tuple[str, int, str]:
    """A whole (non-streamed) generation: its text, token count and finish reason."""
    parts, n, finish = [], 0, None
    for step in steps:
        parts.append(step.text)
        n += step.tokens
        finish = step.finish or finish
    return "".join(parts), n, finish or "stop"


def coalesce(steps: Iterator[Step], interval_s: float) -> Iterator[Step]:
    """Merge steps produced within `interval_s` of the last sent one; the first and last go at once."""
    text, tokens, last_sent, first = "", 0, 0.0, True
    try:
        for step in steps:
            text += step.text
            tokens += step.tokens
            now = time.monotonic()
            if step.finish or first or now - last_sent >= interval_s:
                if text or step.finish or first:
                    yield Step(text, tokens, step.finish)
                    text, tokens, last_sent, first = "", 0, now, False
    finally:
        close = getattr(steps, "close", None)
        if close:
            close()


class Instance:
    def __init__(self, load: p.LoadInstance, device: str, run_on=None, submit_on=None,
                 trusted_models: list[str] | None = None):
        self.spec = load
        self.trusted_models = list(trusted_models or [])
        self.run_on = run_on  # call(fn, *args) on the worker's main thread
        self.submit_on = submit_on  # submit(fn) -> Future on the worker's main thread
        self.uid = load.model_uid
        self.replica = load.replica
        self.device = device
        self.state = "launching"
        self.error = ""
        self.progress = 0.0
        self.inflight = 0
        self.backend: LLMBackend | EmbeddingBackend | None = None
        self.batcher = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def trust_remote_code(self) -> bool:
        """This worker's own settings decide whether a model's code may run here (never the request)."""
        name = (self.spec.llm or self.spec.embedding).model_name
        trusted = name in self.trusted_models
        if self.spec.options.trust_remote_code and not trusted:
            raise Forbidden(f"trust_remote_code: model {name!r} may not run its own code on this worker (not in "
                            "its trust_remote_code_models setting)", field="trust_remote_code")
        return trusted

    def load(self) -> None:
        load, opts = self.spec, self.spec.options
        trust = self.trust_remote_code()
        if load.model_type == "embedding":
            from services.worker.backends.sentence_backend import SentenceTransformersBackend
            from services.worker.batching import EmbeddingBatcher

            path = files.resolve_embedding_files(load.embedding)
            self.progress = 0.3
            backend = SentenceTransformersBackend(path, self.device, load.embedding.max_tokens, trust)
            if backend.dimensions != load.embedding.dimensions:
                backend.close()
                raise InvalidRequest(f"the model at {path} makes {backend.dimensions}-dimensional embeddings; "
                                     f"the registration says dimensions={load.embedding.dimensions}",
                                     field="dimensions")
            self.backend = backend
            self.batcher = EmbeddingBatcher(backend, max_batch_size=opts.max_batch_size or 256,
                                            wait_ms=opts.batch_wait_ms or 0.0, run_on=self.run_on)
        else:
            spec, family = load.spec, load.llm
            path = files.resolve_llm_files(spec, load.quantization)
            self.progress = 0.3
            if spec.model_format == "pytorch":
                from services.worker.backends.transformers_backend import TransformersBackend

                self.backend = TransformersBackend(
                    path, self.device, load.quantization, family.context_length, trust_remote_code=trust,
                    # Default on a GPU. On a CPU the batch's paged attention makes one long stream 5x slower (6,000
                    # tokens: 18 s against 3.8 s), so requests run one by one unless the launch asks for batching.
                    continuous_batching=(self.device.startswith("cuda") if opts.continuous_batching is None
                                         else opts.continuous_batching),
                    run_on=self.submit_on, fast_decode=opts.fast_decode is not False,
                    max_sequences=opts.max_sequences or 64)
            else:
                from services.worker.backends.llama_cpp_backend import LlamaCppBackend

                self.backend = LlamaCppBackend(path, self.device, family.context_length, n_threads=opts.n_threads)
        self.progress = 1.0
        self.state = "ready"

    def close(self) -> None:
        self.state = "terminating"
        if self.batcher is not None:
            self.batcher.close()
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def report(self) -> p.InstanceReport:
        load = self.spec
        spec = load.spec
        return p.InstanceReport(
            model_uid=self.uid, replica=self.replica,
            model_name=(load.llm or load.embedding).model_name, model_type=load.model_type,
            model_format=spec.model_format if spec else "", quantization=load.quantization or "",
            model_size_in_billions=spec.model_size_in_billions if spec else None,
            state=self.state, error=self.error, progress=self.progress, memory=load.memory_estimate,
            queue_depth=self.backend.queue_depth() if isinstance(self.backend, LLMBackend) else 0,
            inflight=self.inflight)

    def check_ready(self) -> None:
        if self.state != "ready":
            detail = f": {self.error}" if self.error else ""
            raise InstanceNotReady(f"model {self.uid!r} is {self.state}{detail}", field="model_uid")

    # ------------------------------------------------------------------ LLM

    def _sampling(self, cfg: p.GenerateConfig, prompt_tokens: int, extra_stop_ids=()) -> Sampling:
        ctx_len = self.backend.context_length
        if prompt_tokens >= ctx_len:
            raise TooLarge(f"the prompt has {prompt_tokens} tokens; context_length is {ctx_len}", field="prompt")
        max_tokens = cfg.max_tokens if cfg.max_tokens is not None else min(DEFAULT_MAX_TOKENS,
                                                                            ctx_len - prompt_tokens)
        if max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {max_tokens}", field="max_tokens")
        if prompt_tokens + max_tokens > ctx_len:
            raise TooLarge(f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                           f"{prompt_tokens + max_tokens} > context_length {ctx_len}", field="max_tokens")
        temperature = 1.0 if cfg.temperature is None else cfg.temperature
        if temperature < 0:
            raise InvalidRequest("temperature must be >= 0", field="temperature")
        return Sampling(max_tokens, temperature, cfg.top_p, cfg.top_k, cfg.seed,
                        tuple(dict.fromkeys([*(cfg.stop_token_ids or ()), *extra_stop_ids])),
                        cfg.repetition_penalty)

    def _steps(self, prompt: str, cfg: p.GenerateConfig, cancelled: threading.Event, stops: list[str],
               stop_ids=()) -> tuple[int, Iterator[Step]]:
        prompt_ids = self.backend.tokenize(prompt)
        prompt_tokens = len(prompt_ids)
        sampling = self._sampling(cfg, prompt_tokens, stop_ids)
        steps = apply_stops(self.backend.stream(prompt_ids, sampling, cancelled), stops)
        if cfg.stream:
            interval = DEFAULT_STREAM_INTERVAL_MS if cfg.stream_interval_ms is None else cfg.stream_interval_ms
            steps = coalesce(steps, interval / 1000)
        return prompt_tokens, steps

    def _tracked(self, steps: Iterator[Step]) -> Iterator[Step]:
        with self._lock:
            self.inflight += 1
        try:
            yield from steps
        finally:
            with self._lock:
                self.inflight -= 1

    def generate(self, msg: p.Generate, cancelled: threading.Event):
        self.check_ready()
        family = self.spec.llm
        if "generate" not in family.model_ability and "chat" not in family.model_ability:
            raise InvalidRequest(f"model {self.uid!r} cannot generate (abilities {family.model_ability})")
        stops = _stops(msg.config.stop, family.stop)
        prompt_tokens, steps = self._steps(msg.prompt, msg.config, cancelled, stops, family.stop_token_ids or ())
        return self._completion(msg.config.stream, prompt_tokens, self._tracked(steps))

    def _completion(self, stream: bool, prompt_tokens: int, steps: Iterator[Step]):
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
        usage = _usage(prompt_tokens)
        if not stream:
            text, n, finish = _collect(steps)
            return p.Completion(id=cid, created=created, model=self.uid, usage=usage(n),
                                choices=[p.CompletionChoice(text=text, finish_reason=finish)])

        def chunks():
            n = 0
            for step in steps:
                n += step.tokens
                yield p.Completion(id=cid, created=created, model=self.uid,
                                   choices=[p.CompletionChoice(text=step.text, finish_reason=step.finish)],
                                   usage=usage(n) if step.finish else None)
        return chunks()

    def chat_prompt(self, messages: list[p.ChatMessage]) -> tuple[str, list[str], list[int]]:
        family = self.spec.llm
        style = family.prompt_style if not isinstance(family.prompt_style, str) else None
        stops = _stops(family.stop)
        stop_ids = list(family.stop_token_ids or [])
        if family.chat_template:
            prompt = prompts.render_chat_template(family.chat_template, messages, self.backend.bos_token,
                                                  self.backend.eos_token)
        elif style is not None:
            prompt = prompts.render_prompt_style(style, messages)
            stops = _stops(stops, style.stop)
            stop_ids += list(style.stop_token_ids or [])
        elif self.backend.chat_template:
            prompt = prompts.render_chat_template(self.backend.chat_template, messages, self.backend.bos_token,
                                                  self.backend.eos_token)
        else:
            raise InvalidRequest(f"model {self.uid!r} has no chat template or prompt style")
        return prompt, stops, stop_ids

    def chat(self, msg: p.Chat, cancelled: threading.Event):
        self.check_ready()
        family = self.spec.llm
        if "chat" not in family.model_ability:
            raise InvalidRequest(f"model {self.uid!r} cannot chat (abilities {family.model_ability}); "
                                 "use generate", field="model_uid")
        if not msg.messages:
            raise InvalidRequest("messages must not be empty", field="messages")
        prompt, stops, stop_ids = self.chat_prompt(msg.messages)
        prompt_tokens, steps = self._steps(prompt, msg.config, cancelled, _stops(msg.config.stop, stops),
                                           stop_ids)
        steps = self._tracked(steps)
        cid, created = f"chatcmpl-{uuid.uuid4()}", int(time.time())
        usage = _usage(prompt_tokens)
        if not msg.config.stream:
            text, n, finish = _collect(steps)
            return p.ChatCompletion(id=cid, created=created, model=self.uid, usage=usage(n), choices=[
                p.ChatChoice(message=p.ChatCompletionMessage(role="assistant", content=text), finish_reason=finish)])

        def chunks():
            n = 0
            yield p.ChatCompletionChunk(id=cid, created=created, model=self.uid, choices=[
                p.ChatDeltaChoice(delta=p.ChatCompletionMessage(role="assistant", content=""))])
            for step in steps:
                n += step.tokens
                yield p.ChatCompletionChunk(
                    id=cid, created=created, model=self.uid, usage=usage(n) if step.finish else None,
                    choices=[p.ChatDeltaChoice(delta=p.ChatCompletionMessage(role=None, content=step.text),
                                               finish_reason=step.finish)])
        return chunks()

    # ------------------------------------------------------------------ embeddings

    def embed(self, msg: p.Embed):
        self.check_ready()
        texts = msg.input
        if not texts:
            raise InvalidRequest("input must not be empty", field="input")
        with self._lock:
            self.inflight += 1
        try:
            if isinstance(self.backend, EmbeddingBackend):
                vectors, tokens = self.batcher.submit(texts)
            else:
                if "embed" not in self.spec.llm.model_ability:
                    raise InvalidRequest(f"model {self.uid!r} cannot embed (abilities "
                                         f"{self.spec.llm.model_ability})", field="model_uid")
                for i, text in enumerate(texts):
                    n = len(self.backend.tokenize(text))
                    if n > self.backend.context_length:
                        raise TooLarge(f"input[{i}] has {n} tokens; context_length is "
                                       f"{self.backend.context_length}", field=f"input[{i}]")
                vectors, tokens = self.backend.embed(texts)
        finally:
            with self._lock:
                self.inflight -= 1
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        reply = p.Embedding(model=self.uid, rows=vectors.shape[0], dimensions=vectors.shape[1],
                            prompt_tokens=tokens)
        return reply, [memoryview(vectors).cast("B")]

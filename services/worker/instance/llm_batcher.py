"""Generation on the compute loop: requests become sequences of one backend, decoded together step by step.

A request is first made ready on the batcher's preparing thread (prepare.py), beside the decode: its chat
rendered (time-limited), its prompt tokenized, its images processed where the engine allows it off the loop,
its sampling checked against the context and the engine, its grammar compiled. Each step on the compute loop then:
admit ready requests while the backend has room, run one backend step (one decode for every sequence held;
prefill for new ones), turn each sequence's new tokens into text and replies (services/worker/instance/output.py),
and drop sequences that are done, cut by a stop word, or cancelled by their client. Embed requests to an LLM with
the `embed` ability run here too, a few texts per step.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
import numpy as np

from zinfer.services.worker.instance import prompts
from zinfer.services.worker.instance.answer import AnswerSplitter
from zinfer.services.worker.instance.backends.base import Detokenizer, LLMBackend, Sampling
from zinfer.services.worker.instance.compute import Batcher, Job, check_room
from zinfer.services.worker.instance.grammar import Constraint, constraint_of, tool_constraint
from zinfer.services.worker.instance.output import Generation, merge_stops
from zinfer.services.worker.instance.prepare import Preparer
from zinfer.shared import instances, toolcalls
from zinfer.shared import protocol as p
from zinfer.shared.errors import Conflict, InvalidRequest, NotFound, TooLarge
from zinfer.shared.models import LLMFamily
from zinfer.shared.payloads import ChatMessage, ChatOptions, GenerateConfig, ImagePart, LoraAdapter, TextPart
from zinfer.shared.toolcalls import ToolParser

DEFAULT_MAX_TOKENS = 1024
EMBED_TEXTS_PER_STEP = 16


class ChatPlan(NamedTuple):
    """What a chat request becomes before decoding: its prompt, where the template came from, its stops, and how
    its answer is taken apart (tool parser, reasoning tags) and constrained."""

    prompt: str
    source: str
    stops: list[str]
    stop_ids: list[int]
    parser: ToolParser | None = None
    tags: tuple[str, str] | None = None
    opened: bool = False  # the prompt ends inside the reasoning tags (the template opened them)
    constraint: Constraint | None = None
    images: tuple = ()  # the messages' ImageParts, in order (a vision model's prompt has a place for each)


class _Start(NamedTuple):
    """A chat, completion or chat rendering as the preparing thread leaves it for the compute loop."""

    prompt: str
    plan: ChatPlan | None
    stops: list[str]
    stop_ids: list[int]
    prompt_ids: list[int] | None = None  # None: images the engine encodes on the compute loop only
    media: Any = None
    sampling: Sampling | None = None
    matchers: list | None = None  # a grammar matcher per choice


class _Ready(NamedTuple):
    """A request the preparing thread is done with: its start, or the error that refuses it (answered on the
    compute loop, which counts it)."""

    job: Job
    error: Exception | None = None
    start: _Start | None = None


class _Running:
    """One sequence: choice `index` of its request's generation."""

    __slots__ = ("job", "gen", "index", "detok")

    def __init__(self, job: Job, gen: Generation, index: int, detok: Detokenizer):
        self.job, self.gen, self.index, self.detok = job, gen, index, detok


class _EmbedWork:
    __slots__ = ("job", "next", "parts", "tokens")

    def __init__(self, job: Job):
        self.job, self.next, self.parts, self.tokens = job, 0, [], 0


class LLMBatcher(Batcher):
    def __init__(self, uid: str, family: LLMFamily, backend: LLMBackend, wake: Callable[[], None], max_queue: int,
                 template_timeout_s: float = 1.0):
        self.uid = uid
        self.name = f"model {uid}"
        self.family = family
        self.backend = backend
        self.wake = wake
        self.max_queue = max_queue
        self.template_timeout_s = template_timeout_s
        self.preparer = Preparer(self.name, self._prepare, wake)
        self.running: dict[int, _Running] = {}
        self.embeds: deque[_EmbedWork] = deque()
        self._ids = itertools.count()
        self.stats = instances.InstanceStats()
        if "chat" in family.model_ability:
            self.template(False)  # a chat model with no template anywhere is refused at launch, naming chat_template
        self.tool_parser = self._find_tool_parser()

    # ------------------------------------------------------------------ from the I/O thread

    def submit(self, job: Job) -> None:
        check_room(self.name, self.preparer.held() + len(self.running) + len(self.embeds), self.max_queue)
        self.preparer.put(job)  # the compute loop is woken once the request is ready

    def depth(self) -> int:
        return self.preparer.waiting()

    def inflight(self) -> int:
        return len(self.running) + len(self.embeds) + self.preparer.preparing()

    # ------------------------------------------------------------------ on the compute loop

    def has_work(self) -> bool:
        return bool(self.running or self.embeds or
                    (self.preparer.ready and self.backend.active() < self.backend.max_sequences))

    def stop(self, error: Exception) -> None:
        self.preparer.close(error)
        self.fail_all(error)

    def fail_all(self, error: Exception) -> None:
        held = self.preparer.drain()
        self.stats.failures += len(self.running) + len(self.embeds) + len(held)
        for seq_id, run in list(self.running.items()):
            self.backend.remove(seq_id)
            run.job.fail(error)
        self.running.clear()
        for work in self.embeds:
            work.job.fail(error)
        self.embeds.clear()
        for job in held:
            job.fail(error)

    def step(self) -> None:
        cancelled = set()
        for seq_id, run in list(self.running.items()):  # clients that gave up: free their place first
            if run.job.cancelled:
                if run.job not in cancelled:
                    cancelled.add(run.job)
                    # Counted before it leaves `running`: a report (read on the I/O thread, inflight first) that
                    # shows the request gone shows it counted.
                    self.stats.cancelled += 1
                    run.job.drop_cancelled()
                self.backend.remove(seq_id)
                del self.running[seq_id]
        self._admit()
        if self.embeds:
            self._embed_step()
        if not self.backend.active():
            return
        for out in self.backend.step():
            self.stats.tokens_out += len(out.tokens)
            run = self.running.get(out.seq_id)
            if run is None:
                continue
            text = run.detok.push(out.tokens) if out.tokens else ""
            if out.finish is not None:
                text += run.detok.flush()
            if run.gen.add(run.index, text, out.tokens, out.finish, out.logprobs):
                del self.running[out.seq_id]
                if out.finish is None:  # cut by a stop word: the backend still holds it
                    self.backend.remove(out.seq_id)

    def _admit(self) -> None:
        ready = self.preparer.ready
        while ready and self.backend.active() + self._needs(ready[0].job) <= self.backend.max_sequences:
            item = ready.popleft()
            job = item.job
            if job.cancelled:
                job.drop_cancelled()
                self.stats.cancelled += 1
                continue
            self.stats.requests += 1
            if isinstance(job.msg, p.Embed):
                self.embeds.append(_EmbedWork(job))
                continue
            try:
                if item.error is not None:
                    raise item.error
                start = self._complete(job, item.start)
                if isinstance(job.msg, p.RenderChat):
                    job.reply(p.RenderedChat(model=self.uid, prompt=start.prompt, token_ids=start.prompt_ids,
                                             template_source=start.plan.source))
                else:
                    self._begin(job, start)
            except Exception as exc:  # a refusal of this request (typed), never of the batcher
                self.stats.failures += 1
                job.fail(exc)

    def _needs(self, job: Job) -> int:
        """Sequences a request takes (one per choice): at most all the backend has, so it always fits once idle."""
        n = getattr(getattr(job.msg, "config", None), "n", 1)
        return min(n, self.backend.max_sequences)

    def _complete(self, job: Job, start: _Start) -> _Start:
        """Images the engine encodes on this thread only, and what needs their ids: sampling, grammar."""
        if start.prompt_ids is None:
            start = self._tokenized(start, on_loop=True)
            if not isinstance(job.msg, p.RenderChat):
                start = self._ready_to_add(job.msg, start)
        return start

    def _begin(self, job: Job, start: _Start) -> None:
        msg, cfg, plan = job.msg, job.msg.config, start.plan
        if cfg.lora_name is not None and cfg.lora_name not in self.backend.adapters:  # unloaded since it was ready
            raise self._unloaded(cfg.lora_name)
        if start.matchers:
            self.stats.grammars_compiled = self.backend.grammars.compiles
        self.stats.tokens_in += len(start.prompt_ids)
        splitter = None
        if plan is not None and (plan.parser is not None or plan.tags is not None):
            splitter = lambda: AnswerSplitter(plan.tags, plan.parser, plan.opened)  # noqa: E731
        gen = Generation(job, self.uid, isinstance(msg, p.Chat), len(start.prompt_ids), start.stops, cfg,
                         echo=start.prompt if cfg.echo else "", token_text=self.backend.token_text, splitter=splitter)
        sampling, ids = start.sampling, [next(self._ids) for _ in range(cfg.n)]
        for index, seq_id in enumerate(ids):
            self.running[seq_id] = _Running(job, gen, index, self.backend.detokenizer())
            seeded = sampling if sampling.seed is None else sampling._replace(seed=sampling.seed + index)
            if start.matchers:
                seeded = seeded._replace(matcher=start.matchers[index])
            self.backend.add(seq_id, start.prompt_ids, seeded, same_prompt_as=ids[0] if index else None)

    # ------------------------------------------------------------------ on the preparing thread (prepare.py)

    def _prepare(self, job: Job) -> _Ready:
        msg = job.msg
        if job.cancelled or isinstance(msg, p.Embed):
            return _Ready(job)
        try:
            if isinstance(msg, p.RenderChat):
                plan = self.plan(msg.messages, msg.options, None, lambda: job.cancelled)
                return _Ready(job, start=self._tokenized(_Start(plan.prompt, plan, [], [])))
            return _Ready(job, start=self._ready_to_add(msg, self._tokenized(self._prompt(job))))
        except Exception as exc:  # a refusal of this request (typed): the compute loop answers it
            return _Ready(job, error=exc)

    def _prompt(self, job: Job) -> _Start:
        msg, family = job.msg, self.family
        if isinstance(msg, p.Chat):
            plan = self.plan(msg.messages, msg.options, msg.config, lambda: job.cancelled)
            start = _Start(plan.prompt, plan, merge_stops(msg.config.stop, plan.stops), plan.stop_ids)
        else:
            if "generate" not in family.model_ability and "chat" not in family.model_ability:
                raise InvalidRequest(f"model {self.uid!r} cannot generate (abilities {family.model_ability})",
                                     field="model_uid")
            start = _Start(msg.prompt, None, merge_stops(msg.config.stop, family.stop),
                           list(family.stop_token_ids or []))
        cfg = msg.config
        if cfg.n > self.backend.max_sequences:
            raise InvalidRequest(f"n={cfg.n}: {self.name} decodes at most {self.backend.max_sequences} sequences at "
                                 "once (launch it with more: n_parallel / max_sequences)", field="n")
        if cfg.echo and isinstance(msg, p.Chat):
            raise InvalidRequest("echo is for completions (generate), not chat", field="echo")
        if cfg.echo and cfg.logprobs not in (None, False):
            raise InvalidRequest("echo with logprobs (logprobs of the prompt) is not supported", field="echo")
        return start

    def _tokenized(self, start: _Start, on_loop: bool = False) -> _Start:
        """The prompt's ids, and its images' tensors; images stay for the compute loop where the engine encodes
        them in a context of its own (llama.cpp's multimodal projector)."""
        plan = start.plan
        if plan is not None and plan.images:
            if not (on_loop or self.backend.media_anywhere):
                return start
            ids, media = self.backend.encode_images(start.prompt, plan.images)
            return start._replace(prompt_ids=ids, media=media)
        return start._replace(prompt_ids=self.backend.tokenize(start.prompt))

    def _ready_to_add(self, msg, start: _Start) -> _Start:
        """Its sampling, checked against the context and the engine, and a grammar matcher per choice (once the
        prompt's ids are known)."""
        if start.prompt_ids is None:
            return start
        cfg = msg.config
        constraint = start.plan.constraint if start.plan is not None else constraint_of(cfg)
        sampling = self.sampling(cfg, len(start.prompt_ids), start.stop_ids, chat=isinstance(msg, p.Chat))
        if start.media is not None:
            sampling = sampling._replace(media=start.media)
        refused = self.backend.unsupported(sampling)
        if refused is not None:
            raise InvalidRequest(f"{refused} is not supported by the {self.backend.engine} engine (model {self.uid!r})",
                                 field=refused)
        matchers = [self.backend.grammars.matcher(constraint) for _ in range(cfg.n)] if constraint else None
        return start._replace(sampling=sampling, matchers=matchers)

    def sampling(self, cfg: GenerateConfig, prompt_tokens: int, stop_ids=(), chat: bool = False) -> Sampling:
        ctx_len = self.backend.context_length
        if prompt_tokens >= ctx_len:
            raise TooLarge(f"the prompt has {prompt_tokens} tokens; context_length is {ctx_len}", field="prompt")
        max_tokens = cfg.max_tokens if cfg.max_tokens is not None else min(DEFAULT_MAX_TOKENS,
                                                                            ctx_len - prompt_tokens)
        if prompt_tokens + max_tokens > ctx_len:
            raise TooLarge(f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                           f"{prompt_tokens + max_tokens} > context_length {ctx_len}", field="max_tokens")
        temperature = 1.0 if cfg.temperature is None else cfg.temperature
        if cfg.lora_name is not None and cfg.lora_name not in self.backend.adapters:
            raise InvalidRequest(f"lora_name {cfg.lora_name!r}: model {self.uid!r} has no such LoRA adapter (loaded: "
                                 f"{', '.join(sorted(self.backend.adapters)) or 'none'})", field="lora_name")
        if cfg.lora_scale is not None and cfg.lora_name is None:
            raise InvalidRequest("lora_scale is the strength of an adapter: name one with lora_name",
                                 field="lora_scale")
        if cfg.min_tokens is not None and cfg.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens {cfg.min_tokens} is more than max_tokens {max_tokens}",
                                 field="min_tokens")
        if chat:  # chat: logprobs is true/false, and top_logprobs says how many alternatives
            logprobs = (cfg.top_logprobs or 0) if cfg.logprobs is True else None
            if cfg.top_logprobs and cfg.logprobs is not True:
                raise InvalidRequest("top_logprobs needs logprobs: true", field="top_logprobs")
        else:  # completions: logprobs is how many alternatives
            logprobs = None if cfg.logprobs is None or cfg.logprobs is False else int(cfg.logprobs)
        return Sampling(max_tokens, temperature, cfg.top_p, cfg.top_k, cfg.seed,
                        tuple(dict.fromkeys([*(cfg.stop_token_ids or ()), *stop_ids])), cfg.repetition_penalty,
                        presence_penalty=cfg.presence_penalty or 0.0, frequency_penalty=cfg.frequency_penalty or 0.0,
                        logprobs=logprobs, min_tokens=cfg.min_tokens or 0, ignore_eos=cfg.ignore_eos,
                        adapter=cfg.lora_name, adapter_scale=cfg.lora_scale)

    # ------------------------------------------------------------------ LoRA adapters (on the compute loop)

    def add_adapter(self, lora: LoraAdapter, path: str) -> None:
        if lora.lora_name in self.backend.adapters:
            raise Conflict(f"model {self.uid!r} has a LoRA adapter named {lora.lora_name!r} already; unload it "
                           "first", field="lora_name")
        self.backend.add_adapter(lora, path)

    def drop_adapter(self, name: str) -> None:
        """Unload an adapter; the requests that name it (running or queued) end with an error saying so."""
        if name not in self.backend.adapters:
            raise NotFound(f"model {self.uid!r} has no LoRA adapter named {name!r} (loaded: "
                           f"{', '.join(sorted(self.backend.adapters)) or 'none'})", field="lora_name")
        gone = self._unloaded(name)
        failed = set()
        for seq_id, run in list(self.running.items()):
            if run.job.msg.config.lora_name == name:
                self.backend.remove(seq_id)
                del self.running[seq_id]
                if run.job not in failed:
                    failed.add(run.job)
                    run.job.fail(gone)
        for job in self.preparer.take(lambda j: getattr(getattr(j.msg, "config", None), "lora_name", None) == name):
            job.fail(gone)
        self.stats.failures += len(failed)
        self.backend.drop_adapter(name)

    def _unloaded(self, name: str) -> InvalidRequest:
        return InvalidRequest(f"lora_name {name!r}: the adapter was unloaded from model {self.uid!r}",
                              field="lora_name")

    def template(self, tools: bool) -> tuple[str | None, str]:
        """(the Jinja template a chat renders with, where it came from), by precedence: the registration's (or
        its built-in family's, which the registry resolved into it), a prompt style, the model's own files
        (chat_template.jinja / tokenizer_config.json, the named `tool_use` template when tools are passed;
        GGUF metadata)."""
        family = self.family
        if family.chat_template:
            return family.chat_template, "registration"
        if family.prompt_style is not None and not isinstance(family.prompt_style, str):
            return None, "prompt_style"
        own = self.backend.chat_template
        if isinstance(own, dict):
            own = own.get("tool_use") if tools and "tool_use" in own else own.get("default")
        if own:
            return own, "model"
        raise InvalidRequest(f"model {self.uid!r} has no chat template: its registration gives no chat_template "
                             "or prompt_style and its files have none; register it with chat_template",
                             field="chat_template")

    def _find_tool_parser(self) -> ToolParser | None:
        """The registration's tool_parser, else the format its template writes calls in (None: neither)."""
        name = self.family.v2_extras.get("tool_parser")
        if name:
            return toolcalls.lookup(name)
        own = self.backend.chat_template
        texts = [self.family.chat_template or ""] + (list(own.values()) if isinstance(own, dict) else [own or ""])
        return next((found for t in texts if (found := toolcalls.detect(t)) is not None), None)

    def reasoning_tags(self) -> tuple[str, str] | None:
        extras = self.family.v2_extras
        start, end = extras.get("reasoning_start_tag"), extras.get("reasoning_end_tag")
        return (start, end) if start and end else None

    def plan(self, messages: list[ChatMessage], options: ChatOptions, cfg: GenerateConfig | None = None,
             cancelled=None) -> ChatPlan:
        family = self.family
        if "chat" not in family.model_ability:
            raise InvalidRequest(f"model {self.uid!r} cannot chat (abilities {family.model_ability}); "
                                 "use generate", field="model_uid")
        images = [image for m in messages for image in m.images()]
        if images and not ("vision" in family.model_ability and self.backend.vision):
            if "vision" not in family.model_ability:
                why = f"it has no 'vision' ability ({family.model_ability})"
            else:
                why = f"the {self.backend.engine} engine {self.backend.no_vision}"
            raise InvalidRequest(f"{images[0].where}: model {self.uid!r} takes no images: {why}",
                                 field=images[0].where)
        if images and self.backend.media_marker is not None:  # the engine places images at its marker itself
            marker = TextPart(self.backend.media_marker)
            messages = [msgspec.structs.replace(m, parts=[marker if isinstance(part, ImagePart) else part
                                                          for part in m.parts]) if m.parts else m for m in messages]
        stops = merge_stops(family.stop)
        stop_ids = list(family.stop_token_ids or [])
        tools = options.tools or None
        template, source = self.template(bool(tools))
        if template:
            prompt = prompts.render_chat_template(
                template, messages, self.backend.bos_token, self.backend.eos_token, self.template_timeout_s,
                cancelled, tools=tools, add_generation_prompt=options.add_generation_prompt,
                extra={**self.backend.template_vars, **options.chat_template_kwargs})
        else:
            if tools:
                raise InvalidRequest(f"model {self.uid!r} lays chats out with a prompt style, which has no place for "
                                     "tools; register it with a chat_template that shows them", field="tools")
            if images:
                raise InvalidRequest(f"{images[0].where}: model {self.uid!r} lays chats out with a prompt style, "
                                     "which has no place for images; register it with a chat_template",
                                     field=images[0].where)
            style = family.prompt_style
            prompt = prompts.render_prompt_style(style, messages)
            stops = merge_stops(stops, style.stop)
            stop_ids += list(style.stop_token_ids or [])
        parser = None
        constraint = constraint_of(cfg) if cfg is not None else None
        if tools and options.tool_choice != "none":
            parser = self.tool_parser
            if parser is None:
                raise InvalidRequest(
                    f"model {self.uid!r} cannot take tools: its registration names no tool_parser and its chat "
                    f"template writes no call format zinfer knows ({', '.join(toolcalls.NAMES)})", field="tools")
            if options.tool_choice != "auto":
                if constraint is not None:
                    raise InvalidRequest(f"tool_choice {options.tool_choice!r} and {constraint.field} both constrain "
                                         "the answer: ask for one", field="tool_choice")
                typed = options.typed_tools()
                chosen = [t for t in typed if t.function.name == options.tool_choice] if options.tool_choice_named \
                    else typed
                parallel = options.parallel_tool_calls and not options.tool_choice_named
                constraint = tool_constraint(parser.grammar(chosen, parallel, self.backend.grammars.lit))
        tags = self.reasoning_tags()
        opened = bool(tags) and prompt.rstrip().endswith(tags[0])
        return ChatPlan(prompt, source, stops, stop_ids, parser, tags, opened, constraint, tuple(images))

    def _embed_step(self) -> None:
        work = self.embeds[0]
        if work.job.cancelled:
            self.embeds.popleft()
            work.job.drop_cancelled()
            self.stats.cancelled += 1
            return
        try:
            if "embed" not in self.family.model_ability:
                raise InvalidRequest(f"model {self.uid!r} cannot embed (abilities {self.family.model_ability})",
                                     field="model_uid")
            texts = work.job.msg.input[work.next:work.next + EMBED_TEXTS_PER_STEP]
            for i, text in enumerate(texts, start=work.next):
                n = len(self.backend.tokenize(text))
                if n > self.backend.context_length:
                    raise TooLarge(f"input[{i}] has {n} tokens; context_length is {self.backend.context_length}",
                                   field=f"input[{i}]")
            vectors, tokens = self.backend.embed(texts)
        except Exception as exc:
            self.embeds.popleft()
            self.stats.failures += 1
            work.job.fail(exc)
            return
        work.parts.append(vectors)
        work.tokens += tokens
        self.stats.tokens_in += tokens
        work.next += len(texts)
        if work.next < len(work.job.msg.input):
            return
        self.embeds.popleft()
        vectors = np.ascontiguousarray(np.vstack(work.parts), dtype=np.float32)
        if work.job.msg.dimensions not in (None, vectors.shape[1]):  # llama.cpp's vectors are not unit length
            self.stats.failures += 1
            work.job.fail(InvalidRequest(f"dimensions: model {self.uid!r} makes {vectors.shape[1]}-dimensional "
                                         "embeddings that cannot be cut to fewer; leave dimensions out",
                                         field="dimensions"))
            return
        work.job.reply(p.Embedding(model=self.uid, rows=vectors.shape[0], dimensions=vectors.shape[1],
                                   prompt_tokens=work.tokens), [memoryview(vectors).cast("B")])

"""One generation's text on its way to the client: stop words, chunking, logprobs and the reply objects.

The LLM batcher pushes each sequence's new text as decode steps produce it; this turns it into Xinference's (and
OpenAI's) completion and chat objects. A request with `n` choices has one sequence per choice; each choice is
cut at its first stop word (which is not returned; a possible stop prefix is held back until it is decided),
carries its tokens' logprobs when asked, and streams in chunks: tokens produced within `stream_interval_ms` of
its last chunk travel together (the first and the last go at once). The usage counts every choice's tokens.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from zinfer.services.worker.instance.answer import AnswerSplitter
from zinfer.services.worker.instance.backends.base import TokenLogprob
from zinfer.services.worker.instance.compute import Job
from zinfer.shared import protocol as p
from zinfer.shared.payloads import (
    ChatChoice,
    ChatCompletionMessage,
    ChatDeltaChoice,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionTokensDetails,
    FunctionCall,
    GenerateConfig,
    ToolCall,
    TopLogprob,
    Usage,
)
from zinfer.shared.payloads import TokenLogprob as ChatTokenLogprob
from zinfer.shared.toolcalls import Call

DEFAULT_STREAM_INTERVAL_MS = 10.0  # tokens produced within this window travel as one chunk


def merge_stops(*groups) -> list[str]:
    out: list[str] = []
    for g in groups:
        if isinstance(g, str):
            g = [g]
        for s in g or ():
            if s and s not in out:
                out.append(s)
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class StopCutter:
    """Cuts text at the first stop word, holding back the tail that could still become one."""

    __slots__ = ("stops", "buffer")

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.buffer = ""

    def push(self, text: str, last: bool) -> tuple[str, bool]:
        """(text that may go out now, whether a stop word ended the generation)."""
        if not self.stops:
            return text, False
        buffer = self.buffer + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.buffer = ""
            return buffer[:cut], True
        if last:
            self.buffer = ""
            return buffer, False
        hold = max((k for s in self.stops for k in range(1, len(s)) if buffer.endswith(s[:k])), default=0)
        self.buffer = buffer[len(buffer) - hold:]
        return buffer[:len(buffer) - hold], False


class _Logprobs:
    """One choice's logprobs as they accumulate (and, when streaming, as they go out with each chunk)."""

    __slots__ = ("chat", "token_text", "tokens", "values", "tops", "offsets", "offset")

    def __init__(self, chat: bool, token_text: Callable[[int], str], offset: int):
        self.chat, self.token_text, self.offset = chat, token_text, offset
        self.tokens: list[str] = []
        self.values: list[float] = []
        self.tops: list[list[tuple[str, float]]] = []
        self.offsets: list[int] = []

    def add(self, token: int, lp: TokenLogprob) -> None:
        text = self.token_text(token)
        self.tokens.append(text)
        self.values.append(lp.logprob)
        self.tops.append([(self.token_text(i), v) for i, v in lp.top])
        self.offsets.append(self.offset)
        self.offset += len(text)

    def take(self):
        """The logprobs gathered since the last take, in the reply's shape (None when there are none)."""
        if not self.tokens:
            return None
        if self.chat:
            out = ChatLogprobs(content=[
                ChatTokenLogprob(token=t, logprob=v, bytes=list(t.encode()), top_logprobs=[
                    TopLogprob(token=a, logprob=b, bytes=list(a.encode())) for a, b in top])
                for t, v, top in zip(self.tokens, self.values, self.tops, strict=True)])
        else:
            out = CompletionLogprobs(tokens=self.tokens, token_logprobs=list(self.values),
                                       top_logprobs=[{**dict(top), t: v} for t, v, top in
                                                     zip(self.tokens, self.values, self.tops, strict=True)],
                                       text_offset=self.offsets)
        self.tokens, self.values, self.tops, self.offsets = [], [], [], []
        return out


ARGUMENT_PIECE = 32  # a streamed call's arguments go in pieces of this many characters, as OpenAI streams them


class _Choice:
    __slots__ = ("index", "cutter", "parts", "pending", "tokens", "finish", "last_sent", "sent_first", "logprobs",
                 "splitter", "reasoning", "pending_reasoning", "calls", "reasoning_tokens")

    def __init__(self, index: int, stops: list[str], splitter: AnswerSplitter | None = None):
        self.index = index
        self.cutter = StopCutter(stops)
        self.splitter = splitter  # reasoning and tool calls taken out of the text (chat with tags or tools)
        self.parts: list[str] = []  # the whole text, when not streaming
        self.reasoning: list[str] = []
        self.calls: list[Call] = []
        self.reasoning_tokens = 0
        self.pending = ""
        self.pending_reasoning = ""
        self.tokens = 0
        self.finish: str | None = None
        self.last_sent = 0.0
        self.sent_first = False
        self.logprobs: _Logprobs | None = None


class Generation:
    """The reply side of one generate or chat request, with its `n` choices."""

    def __init__(self, job: Job, model_uid: str, chat: bool, prompt_tokens: int, stops: list[str],
                 config: GenerateConfig, echo: str = "", token_text: Callable[[int], str] | None = None,
                 splitter: Callable[[], AnswerSplitter] | None = None):
        self.job = job
        self.model_uid = model_uid
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        self.stream = config.stream
        ms = DEFAULT_STREAM_INTERVAL_MS if config.stream_interval_ms is None else config.stream_interval_ms
        self.interval_s = ms / 1000
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4()}"
        self.created = int(time.time())
        self.choices = [_Choice(i, stops, splitter() if splitter else None) for i in range(config.n)]
        self.reasons = splitter is not None and any(c.splitter.tags for c in self.choices)
        self.open = config.n
        wants_logprobs = config.logprobs is not None and config.logprobs is not False
        for c in self.choices:
            if echo:
                c.parts.append(echo)
                c.pending = echo
            if wants_logprobs and token_text is not None:
                c.logprobs = _Logprobs(chat, token_text, len(echo))
        if chat and self.stream:  # the role comes first, at once (as OpenAI and Xinference send it)
            job.partial(p.ChatCompletionChunk(id=self.id, created=self.created, model=model_uid, choices=[
                ChatDeltaChoice(index=c.index, delta=ChatCompletionMessage(role="assistant", content=""))
                for c in self.choices]))

    def add(self, index: int, text: str, tokens: list[int], finish: str | None, lp: TokenLogprob | None) -> bool:
        """Choice `index` got new text from `tokens` (finish: why it ended, on its last step). True when that
        choice is over (ended, or cut by a stop word): the batcher then drops its sequence."""
        c = self.choices[index]
        out, stopped = c.cutter.push(text, finish is not None)
        if stopped:
            finish = "stop"
        c.tokens += len(tokens)
        if c.logprobs is not None and lp is not None:
            c.logprobs.add(tokens[0], lp)
        reasoning, calls = "", []
        if c.splitter is not None:
            if c.splitter.in_reasoning:
                c.reasoning_tokens += len(tokens)
            pieces = c.splitter.push(out, finish is not None)
            out, reasoning, calls = pieces.content, pieces.reasoning, pieces.calls
            c.calls += calls
        if finish is not None:
            c.finish = "tool_calls" if c.calls and finish == "stop" else finish
            self.open -= 1
        if not self.stream:
            c.parts.append(out)
            c.reasoning.append(reasoning)
            if not self.open:
                self.job.reply(self._whole())
            return finish is not None
        c.pending += out
        c.pending_reasoning += reasoning
        if calls:
            self._send_calls(c, calls)
        now = time.monotonic()
        if finish is not None or not c.sent_first or now - c.last_sent >= self.interval_s:
            if c.pending or c.pending_reasoning or finish is not None or not c.sent_first:
                chunk = self._chunk(c, c.finish if finish is not None else None)
                if self.open:
                    self.job.partial(chunk)
                else:
                    self.job.reply(chunk)  # the last choice's last chunk ends the stream, with the usage
                c.pending, c.pending_reasoning, c.last_sent, c.sent_first = "", "", now, True
        return finish is not None

    def _send_calls(self, c: _Choice, calls: list[Call]) -> None:
        """Each call as OpenAI streams it: its index, id and name first, then its arguments in pieces (text that
        came before it goes first)."""
        if c.pending or c.pending_reasoning:
            self.job.partial(self._chunk(c, None))
            c.pending, c.pending_reasoning, c.sent_first = "", "", True
        first = len(c.calls) - len(calls)
        for k, call in enumerate(calls, start=first):
            self.job.partial(self._delta(c, ToolCall(index=k, id=call.id, type="function",
                                                     function=FunctionCall(name=call.name, arguments=""))))
            args = call.arguments
            for at in range(0, len(args), ARGUMENT_PIECE):
                self.job.partial(self._delta(c, ToolCall(index=k, function=FunctionCall(
                    arguments=args[at:at + ARGUMENT_PIECE]))))

    def _delta(self, c: _Choice, call: ToolCall) -> p.Msg:
        return p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model_uid, choices=[
            ChatDeltaChoice(index=c.index, delta=ChatCompletionMessage(role=None, tool_calls=[call]))])

    def _usage(self) -> Usage:
        used = usage(self.prompt_tokens, sum(c.tokens for c in self.choices))
        if self.reasons:
            used.completion_tokens_details = CompletionTokensDetails(
                reasoning_tokens=sum(c.reasoning_tokens for c in self.choices))
        return used

    def _message(self, c: _Choice) -> ChatCompletionMessage:
        content = "".join(c.parts)
        reasoning = "".join(c.reasoning) or None
        calls = [ToolCall(id=call.id, type="function", function=FunctionCall(name=call.name,
                                                                             arguments=call.arguments))
                 for call in c.calls] or None
        return ChatCompletionMessage(role="assistant", content=content if content or not calls else None,
                                     reasoning_content=reasoning, reasoning=reasoning, tool_calls=calls)

    def _whole(self) -> p.Msg:
        if self.chat:
            return p.ChatCompletion(id=self.id, created=self.created, model=self.model_uid, usage=self._usage(),
                                    choices=[ChatChoice(index=c.index, finish_reason=c.finish, message=self._message(c),
                                                        logprobs=c.logprobs.take() if c.logprobs else None)
                                             for c in self.choices])
        return p.Completion(id=self.id, created=self.created, model=self.model_uid, usage=self._usage(),
                            choices=[CompletionChoice(text="".join(c.parts), index=c.index, finish_reason=c.finish,
                                                        logprobs=c.logprobs.take() if c.logprobs else None)
                                     for c in self.choices])

    def _chunk(self, c: _Choice, finish: str | None) -> p.Msg:
        used = self._usage() if not self.open else None
        logprobs = c.logprobs.take() if c.logprobs else None
        if self.chat:
            reasoning = c.pending_reasoning or None
            delta = ChatCompletionMessage(role=None, content=c.pending if c.pending or not reasoning else None,
                                          reasoning_content=reasoning, reasoning=reasoning)
            return p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model_uid, usage=used,
                                         choices=[ChatDeltaChoice(index=c.index, delta=delta, logprobs=logprobs,
                                                                  finish_reason=finish)])
        return p.Completion(id=self.id, created=self.created, model=self.model_uid, usage=used,
                            choices=[CompletionChoice(text=c.pending, index=c.index, logprobs=logprobs,
                                                        finish_reason=finish)])

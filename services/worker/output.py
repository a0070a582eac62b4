"""One generation's text on its way to the client: stop words, chunking and the reply objects.

The engine pushes each sequence's new text as decode steps produce it; this turns it into Xinference's
completion / chat objects: cut at the first stop word (which is not returned; a possible stop prefix is held
back until it is decided), tokens produced within `stream_interval_ms` of the last chunk sent travel as one
chunk (the first and the last go at once), and a whole (non-streamed) generation becomes one reply.
"""

from __future__ import annotations

import time
import uuid

from services.worker.compute import Job
from shared import protocol as p

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


def usage(prompt_tokens: int, completion_tokens: int) -> p.Usage:
    return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
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


class Generation:
    """The reply side of one generate or chat request."""

    def __init__(self, job: Job, model_uid: str, chat: bool, prompt_tokens: int, stops: list[str],
                 config: p.GenerateConfig):
        self.job = job
        self.model_uid = model_uid
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        self.cutter = StopCutter(stops)
        self.stream = config.stream
        ms = DEFAULT_STREAM_INTERVAL_MS if config.stream_interval_ms is None else config.stream_interval_ms
        self.interval_s = ms / 1000
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4()}"
        self.created = int(time.time())
        self.tokens = 0
        self.parts: list[str] = []  # the whole text, when not streaming
        self.pending_text = ""
        self.last_sent = 0.0
        self.sent_first = False
        if chat and self.stream:  # the role comes first, at once (as OpenAI and Xinference send it)
            job.partial(p.ChatCompletionChunk(id=self.id, created=self.created, model=model_uid, choices=[
                p.ChatDeltaChoice(delta=p.ChatCompletionMessage(role="assistant", content=""))]))

    def add(self, text: str, tokens: int, finish: str | None) -> bool:
        """New text from `tokens` decoded tokens (finish: why generation ended, on its last step). True when the
        generation is over (ended, or cut by a stop word): the engine then drops the sequence."""
        out, stopped = self.cutter.push(text, finish is not None)
        if stopped:
            finish = "stop"
        self.tokens += tokens
        if not self.stream:
            self.parts.append(out)
            if finish is not None:
                self.job.reply(self._whole("".join(self.parts), finish))
            return finish is not None
        self.pending_text += out
        now = time.monotonic()
        if finish is not None or not self.sent_first or now - self.last_sent >= self.interval_s:
            if self.pending_text or finish is not None or not self.sent_first:
                chunk = self._chunk(self.pending_text, finish)
                if finish is not None:
                    self.job.reply(chunk)
                else:
                    self.job.partial(chunk)
                self.pending_text, self.last_sent, self.sent_first = "", now, True
        return finish is not None

    def _whole(self, text: str, finish: str) -> p.Msg:
        used = usage(self.prompt_tokens, self.tokens)
        if self.chat:
            return p.ChatCompletion(id=self.id, created=self.created, model=self.model_uid, usage=used, choices=[
                p.ChatChoice(message=p.ChatCompletionMessage(role="assistant", content=text), finish_reason=finish)])
        return p.Completion(id=self.id, created=self.created, model=self.model_uid, usage=used,
                            choices=[p.CompletionChoice(text=text, finish_reason=finish)])

    def _chunk(self, text: str, finish: str | None) -> p.Msg:
        used = usage(self.prompt_tokens, self.tokens) if finish is not None else None
        if self.chat:
            return p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model_uid, usage=used,
                                         choices=[p.ChatDeltaChoice(
                                             delta=p.ChatCompletionMessage(role=None, content=text),
                                             finish_reason=finish)])
        return p.Completion(id=self.id, created=self.created, model=self.model_uid, usage=used,
                            choices=[p.CompletionChoice(text=text, finish_reason=finish)])

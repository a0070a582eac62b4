"""One chat choice's text taken apart as it streams: reasoning (between the model's reasoning tags), content, and
tool calls (in the format of its tool parser).

`AnswerSplitter.push(text, last)` takes the choice's new text (after stop words are cut) and returns the pieces
that may go out now; a tag or a call split across tokens is held back until it is decided, so no tag text
reaches `content`. A call goes out whole once it parses (its id and name first, then its arguments); one that
never parses goes out as content at the end. Streamed pieces and the finished message agree: the unary answer
is the streamed pieces joined.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zinfer.shared.toolcalls import Call, ToolParser


def _hold(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of one of `markers`."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


@dataclass
class Pieces:
    reasoning: str = ""
    content: str = ""
    calls: list[Call] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.calls)


class AnswerSplitter:
    """Reasoning first (when the model has tags and starts with the opening one, or the prompt opened it), then
    content, with tool calls taken out of it when a parser is given."""

    def __init__(self, reasoning_tags: tuple[str, str] | None, parser: ToolParser | None, opened: bool = False):
        self.tags = reasoning_tags
        self.parser = parser
        # "start": nothing seen yet (reasoning may open); "reasoning"; "content"
        self.state = "reasoning" if (reasoning_tags and opened) else ("start" if reasoning_tags else "content")
        self.buffer = ""
        self.lead = True  # whitespace at the start of a reasoning or content segment is dropped
        self.trailing = ""  # reasoning's whitespace, held until more reasoning follows
        self.call_text = ""  # a possible call, held
        self.in_call = False
        self.whole = False  # the whole answer may be a call (bare JSON / pythonic formats)
        self.content_started = False
        self.calls: list[Call] = []

    @property
    def in_reasoning(self) -> bool:
        return self.state in ("reasoning", "start")

    def push(self, text: str, last: bool) -> Pieces:
        out = Pieces()
        self.buffer += text
        if self.state == "start":
            stripped = self.buffer.lstrip()
            start = self.tags[0]
            if stripped.startswith(start):
                self.buffer = stripped[len(start):]
                self.state = "reasoning"
            elif start.startswith(stripped) and not last:
                return out  # could still be the opening tag
            else:
                self.state = "content"
        if self.state == "reasoning":
            end = self.tags[1]
            cut = self.buffer.find(end)
            if cut >= 0:
                self._reasoning(out, self.buffer[:cut], final=True)
                self.buffer = self.buffer[cut + len(end):]
                self.state, self.lead = "content", True
            else:
                hold = 0 if last else _hold(self.buffer, (end,))
                self._reasoning(out, self.buffer[:len(self.buffer) - hold], final=last)
                self.buffer = self.buffer[len(self.buffer) - hold:]
                return out
        self._content(out, last)
        return out

    def _reasoning(self, out: Pieces, text: str, final: bool) -> None:
        if self.lead:
            text = text.lstrip()
            if not text:
                return
            self.lead = False
        text = self.trailing + text
        body = text.rstrip()
        self.trailing = "" if final else text[len(body):]
        out.reasoning += body

    def _content(self, out: Pieces, last: bool) -> None:
        text, self.buffer = self.buffer, ""
        if self.lead:
            text = text.lstrip()
            if not text and not last:
                return
            self.lead = False
        if self.parser is None:
            out.content += text
            return
        if not self.content_started and not self.in_call:
            if text and any(text.startswith(m) or m.startswith(text) for m in self.parser.whole_starts):
                self.whole = True
            self.content_started = bool(text)
        if self.whole:  # the whole answer may be one call: decided at the end
            self.call_text += text
            if last:
                content, calls = self.parser.parse(self.call_text)
                self._took(out, content, calls)
            return
        rest: str | None = self.call_text + text
        self.call_text = ""
        while rest:
            if not self.in_call:
                rest = self._before_call(out, rest, last)
            if rest:
                rest = self._call(out, rest, last)

    def _before_call(self, out: Pieces, text: str, last: bool) -> str | None:
        """Content up to the next call's start marker goes out; the text from the marker on is returned. None when
        no call starts in it (the end that may begin a marker is held back)."""
        at = min((i for i in (text.find(m) for m in self.parser.starts) if i >= 0), default=-1)
        if at < 0:
            if self.calls and not text.strip() and not last:  # whitespace between calls: wait and see
                self.call_text = text
                return None
            hold = 0 if last else _hold(text, self.parser.starts)
            if not (self.calls and not text[:len(text) - hold].strip()):
                out.content += text[:len(text) - hold]
            self.call_text = text[len(text) - hold:]
            return None
        if not (self.calls and not text[:at].strip()):
            out.content += text[:at]
        self.in_call = True
        return text[at:]

    def _call(self, out: Pieces, text: str, last: bool) -> str | None:
        """A call from its start marker: parsed once its end marker (or the answer's end) comes, else held (None);
        the text after it is returned."""
        end = min((i + len(m) for m in self.parser.ends for i in [text.find(m)] if i >= 0), default=-1)
        if end < 0 and not last:
            self.call_text = text  # held until it closes (or the answer ends)
            return None
        block, rest = (text, "") if end < 0 else (text[:end], text[end:])
        content, calls = self.parser.parse(block)
        self.in_call = False
        if calls:
            self._took(out, content if content.strip() else "", calls)
        else:
            out.content += block
        return rest

    def _took(self, out: Pieces, content: str, calls: list[Call]) -> None:
        out.content += content
        out.calls += calls
        self.calls += calls

"""Turning chat messages into one prompt: a Jinja chat template, or a prompt style's roles and separators."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from zinfer.shared.errors import Cancelled, InvalidRequest
from zinfer.shared.models import PromptStyle
from zinfer.shared.payloads import ChatMessage


class _GenerationTag(Extension):
    """transformers' {% generation %}...{% endgeneration %} (it marks assistant tokens for training masks):
    rendered as its body, so templates that use it render here as there."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: json.dumps with non-ASCII kept (Jinja's own escapes HTML and sorts keys)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """A chat template compiled in the environment transformers' apply_chat_template uses (sandboxed, immutable,
    trim_blocks and lstrip_blocks, loop controls, its tojson, raise_exception and strftime_now)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


class _TemplateDict:
    """dict() in a template, without the class itself (as transformers gives it)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names (no way to CPython's internals), as transformers' does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a template may not store {name!r} on a namespace")


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def template_messages(messages: list[ChatMessage] | list[dict]) -> list[dict]:
    """Messages as transformers hands them to a template: keys whose value is None dropped, an earlier answer's
    reasoning under `reasoning_content` and `thinking` both."""
    out = []
    for m in messages:
        m = {k: v for k, v in (m if isinstance(m, dict) else m.as_template_dict()).items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


class _TemplateStopped(Exception):
    pass


def _limited(render, timeout_s: float, cancelled):
    """Run render() with a time limit, stopping early if cancelled(): a profile hook (called on every Python
    function call and return, which a template's loops make) checks the clock every 256 calls. A template with
    nested loops over range(100000) is stopped within the limit instead of keeping a core busy for hours."""
    deadline = time.monotonic() + timeout_s
    calls = 0

    def hook(_frame, _event, _arg):
        nonlocal calls
        calls += 1
        if calls & 255 == 0 and (time.monotonic() > deadline or (cancelled is not None and cancelled())):
            raise _TemplateStopped

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        return render()
    finally:
        sys.setprofile(previous)


MAX_RENDERED_CHARS = 8 << 20  # a prompt is far smaller; a template that writes more is stopped


def _render(compiled: jinja2.Template, context: dict) -> str:
    out, size = [], 0
    for piece in compiled.generate(**context):
        size += len(piece)
        if size > MAX_RENDERED_CHARS:
            raise jinja2.exceptions.TemplateError(f"the rendered prompt grew past {MAX_RENDERED_CHARS:,} characters")
        out.append(piece)
    return "".join(out)


def render_chat_template(template: str, messages: list[ChatMessage] | list[dict], bos_token: str = "",
                         eos_token: str = "", timeout_s: float = 1.0, cancelled=None, *, tools: list | None = None,
                         add_generation_prompt: bool = True, extra: dict | None = None) -> str:
    """The chat as one prompt through a Jinja chat template, as transformers' apply_chat_template renders it
    (messages as dicts with their tool_calls, tool_call_id and name; tools as OpenAI's function objects;
    `extra`: the tokenizer's special tokens and the request's chat_template_kwargs). Sandboxed, time-limited,
    size-limited and cancellable; any failure is an InvalidRequest naming `messages`."""
    context = {"bos_token": bos_token, "eos_token": eos_token, **(extra or {}),
               "messages": template_messages(messages),
               "tools": tools or None, "documents": None, "add_generation_prompt": add_generation_prompt}
    try:
        compiled = _compile(template)
        return _limited(lambda: _render(compiled, context), timeout_s, cancelled)
    except _TemplateStopped:
        if cancelled is not None and cancelled():
            raise Cancelled("cancelled while rendering the chat template") from None
        raise InvalidRequest(f"the chat template took over {timeout_s:g}s to render these messages",
                             field="messages") from None
    except jinja2.TemplateError as exc:
        raise InvalidRequest(f"chat_template could not render these messages: {exc}", field="messages") from None
    except (RecursionError, MemoryError):
        raise InvalidRequest("chat_template could not render these messages: it recursed or grew too far",
                             field="messages") from None
    except Exception as exc:  # a template is user code: any failure is a refusal of these messages
        raise InvalidRequest(f"chat_template could not render these messages: {type(exc).__name__}: {exc}",
                             field="messages") from None


def _turns(style: PromptStyle, messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]]]:
    system = style.system_prompt
    roles = {"user": style.roles[0], "assistant": style.roles[1] if len(style.roles) > 1 else "assistant"}
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if m.role == "system":
            if i != 0:
                raise InvalidRequest("a system message may only come first", field=f"messages[{i}].role")
            system = _with_system(style, m.content or "")
            continue
        if m.role not in roles:
            raise InvalidRequest(f"role {m.role!r} must be system, user or assistant", field=f"messages[{i}].role")
        turns.append((roles[m.role], m.content or ""))
    if not turns or turns[-1][0] != roles["user"]:
        raise InvalidRequest("the last message must be the user's", field="messages")
    turns.append((roles["assistant"], ""))
    return system, turns


def _with_system(style: PromptStyle, content: str) -> str:
    """A system message replaces the style's default system text, keeping its markup."""
    if style.style_name == "LLAMA2":
        return f"<s>[INST] <<SYS>>\n{content}\n<</SYS>>\n\n"
    if style.style_name == "CHATML":
        return f"<|im_start|>system\n{content}"
    return content


def render_prompt_style(style: PromptStyle, messages: list[ChatMessage]) -> str:
    system, turns = _turns(style, messages)
    seps = [style.intra_message_sep, style.inter_message_sep]
    name = style.style_name
    if name == "ADD_COLON_SINGLE":
        out = system + seps[0]
        for role, text in turns:
            out += f"{role}: {text}{seps[0]}" if text else f"{role}:"
        return out
    if name == "NO_COLON_TWO":
        out = system
        for i, (role, text) in enumerate(turns):
            out += f"{role}{text}{seps[i % 2]}" if text else role
        return out
    if name == "LLAMA2":
        out = system
        for i, (role, text) in enumerate(turns):
            if not text:
                out += role
            elif i == 0:
                out += text + " "
            else:
                out += f"{role} {text}{seps[i % 2]}"
        return out
    if name == "CHATML":
        out = f"{system}{seps[0]}\n" if system else ""
        for role, text in turns:
            out += f"{role}\n{text}{seps[0]}\n" if text else f"{role}\n"
        return out
    if name == "QWEN":
        out = f"<|im_start|>system\n{system}<|im_end|>"
        for role, text in turns:
            out += f"\n<|im_start|>{role}\n{text}<|im_end|>" if text else f"\n<|im_start|>{role}\n"
        return out
    # ADD_COLON_TWO, and the layout for custom styles of any other name.
    out = system + seps[0]
    for i, (role, text) in enumerate(turns):
        out += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
    return out

"""Turning chat messages into one prompt: a Jinja chat template, or a prompt style's roles and separators."""

from __future__ import annotations

import sys
import time
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from zinfer.shared.errors import Cancelled, InvalidRequest
from zinfer.shared.models import PromptStyle
from zinfer.shared.payloads import ChatMessage


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


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


def render_chat_template(template: str, messages: list[ChatMessage], bos_token: str = "", eos_token: str = "",
                         timeout_s: float = 1.0, cancelled=None) -> str:
    """The chat as one prompt through a Jinja chat template (sandboxed, time-limited, cancellable)."""
    context = {"messages": [{"role": m.role, "content": m.content} for m in messages],
               "add_generation_prompt": True, "bos_token": bos_token, "eos_token": eos_token}
    try:
        compiled = _compile(template)
        return _limited(lambda: compiled.render(**context), timeout_s, cancelled)
    except _TemplateStopped:
        if cancelled is not None and cancelled():
            raise Cancelled("cancelled while rendering the chat template") from None
        raise InvalidRequest(f"the chat template took over {timeout_s:g}s to render these messages",
                             field="messages") from None
    except jinja2.TemplateError as exc:
        raise InvalidRequest(f"chat_template could not render these messages: {exc}", field="messages") from None
    except RecursionError:
        raise InvalidRequest("chat_template could not render these messages: it recursed too deeply",
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
            system = _with_system(style, m.content)
            continue
        if m.role not in roles:
            raise InvalidRequest(f"role {m.role!r} must be system, user or assistant", field=f"messages[{i}].role")
        turns.append((roles[m.role], m.content))
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

"""The agent endpoints: OpenAI's Responses API (POST /v1/responses) and Anthropic's Messages API (POST /v1/messages),
both stateless, over the same chat requests as /v1/chat/completions.

Each turns its request into zinfer's Chat (messages with tool calls and tool results, tools, tool_choice, the
template's options, sampling settings), sends it like a chat completion (loading an unloaded instance first), and
turns the answer (reasoning, text, tool calls, usage) into its own objects, or, streamed, into its own events:
Responses' `response.*` events, Messages' `message_start` ... `message_stop`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import msgspec
from fastapi import Request
from fastapi.responses import Response

from zinfer.services.gateway.asgi import EventStream, body_of
from zinfer.shared import compat
from zinfer.shared import protocol as p
from zinfer.shared.errors import InvalidRequest, ZinferError

_json = msgspec.json.Encoder()


def _response(obj: Any) -> Response:
    return Response(_json.encode(obj), media_type="application/json")


def _text_of(content: Any, where: str, kinds: tuple[str, ...]) -> str:
    """A content that is a string or a list of text blocks (of these types) -> its text."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or a list of content blocks", field=where)
    out = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") not in kinds or not isinstance(block.get("text"), str):
            raise InvalidRequest(f"{where}[{j}]: only text blocks ({', '.join(kinds)}) are supported here",
                                 field=f"{where}[{j}]")
        out.append(block["text"])
    return "\n".join(out)


class _Messages(list):
    """The chat messages an agent request becomes, with where each image part came from in the caller's request,
    so that an error about an image names the caller's field, not the chat's."""

    def __init__(self):
        super().__init__()
        self.places: dict[str, str] = {}

    def images_of_next(self, images: list[tuple[int, str, str]]) -> None:
        """The images (part index, the caller's path of the block, the block's field with the image) of the
        message appended next."""
        for index, caller, field in images:
            at = f"messages[{len(self)}].content[{index}]"
            self.places[f"{at}.image_url"] = f"{caller}.{field}"
            self.places[at] = caller


def _renamed(exc: InvalidRequest, places: dict[str, str]) -> InvalidRequest:
    """An image's refusal with the caller's field in place of the chat's (the longer path first)."""
    for chat, caller in sorted(places.items(), key=lambda kv: -len(kv[0])):
        if exc.field == chat or (exc.field or "").startswith(chat + "."):
            return InvalidRequest(exc.message.replace(chat, caller), field=exc.field.replace(chat, caller, 1))
    return exc


async def _run(gw, request: Request, body: dict, build):
    """(uid, the Chat, its reply or (first chunk, chunks)) of an agent request whose body `build` turns into chat
    fields."""
    conn = gw.connection(request)
    uid, target = await gw.model_target(conn, body)
    chat = build(body)
    places = chat["messages"].places
    chat["messages"] = list(chat["messages"])
    try:
        msg = await gw.chat_request(uid, chat)
        return uid, msg, await gw.answer(conn, target, uid, msg)
    except InvalidRequest as exc:  # the edge's image checks, or the instance's
        raise _renamed(exc, places) from None


async def _deltas(first, chunks):
    """(reasoning, content, tool call piece, finish, usage) of each chunk's first choice."""
    chunk = first
    try:
        while chunk is not None:
            choice = chunk.choices[0] if chunk.choices else None
            delta = choice.delta if choice else None
            calls = (delta.tool_calls or []) if delta else []
            yield ((delta.reasoning_content or "") if delta else "", (delta.content or "") if delta else "",
                   calls[0] if calls else None, choice.finish_reason if choice else None, chunk.usage)
            chunk = await anext(chunks, None)
    finally:
        await chunks.aclose()


class _Parts:
    """What the two streamed replies share: each chunk's pieces fed to the open part (`feed`), the last part
    closed at the end (`close`); the reply's usage and finish reason kept for the closing events."""

    usage = finish = None

    def feed(self, reasoning: str, content: str, call) -> list[bytes]:
        raise NotImplementedError

    def close(self) -> list[bytes]:
        raise NotImplementedError

    async def events(self, first, chunks):
        async for reasoning, content, call, why, used in _deltas(first, chunks):
            self.usage, self.finish = used or self.usage, why or self.finish
            for e in self.feed(reasoning, content, call):
                yield e
        for e in self.close():
            yield e


# ---------------------------------------------------------------------------------------------- Responses API

_RESPONSES_TAKEN = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "stream",
                    "max_output_tokens", "temperature", "top_p", "text", "reasoning", "store", "metadata", "user",
                    "previous_response_id", "include", "truncation", "stream_options", "top_logprobs", "seed"}


def _responses_messages(body: dict) -> _Messages:
    """A Responses request's instructions and input items as chat messages."""
    messages = _Messages()
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise InvalidRequest("input is required: a string or a list of items", field="input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", field=where)
        kind = item.get("type", "message")
        if kind not in _INPUT_ITEMS:
            raise InvalidRequest(f"{where}.type {kind!r} is not supported (message, function_call, "
                                 "function_call_output, reasoning)", field=f"{where}.type")
        _INPUT_ITEMS[kind](item, where, messages)
    return messages


def _message_input(item: dict, where: str, messages: _Messages) -> None:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise InvalidRequest(f"{where}.role must be user, assistant, system or developer", field=f"{where}.role")
    content = item.get("content")
    if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "input_image" for b in content):
        parts, images = [], []  # text and images in order, as chat's content parts (the chat path checks them)
        for j, block in enumerate(content):
            if block.get("type") == "input_image" and isinstance(block.get("image_url"), str):
                images.append((len(parts), f"{where}.content[{j}]", "image_url"))
                parts.append({"type": "image_url", "image_url": {"url": block["image_url"]}})
            else:
                parts.append({"type": "text", "text": _text_of([block], f"{where}.content[{j}]",
                                                                ("input_text", "output_text", "text"))})
        messages.images_of_next(images)
        messages.append({"role": "system" if role == "developer" else role, "content": parts})
        return
    text = _text_of(content, f"{where}.content", ("input_text", "output_text", "text"))
    messages.append({"role": "system" if role == "developer" else role, "content": text})


def _call_input(item: dict, where: str, messages: list[dict]) -> None:
    """A call the model made earlier: joins the assistant turn before it, if that turn made calls too."""
    call = {"id": item.get("call_id"), "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
    last = messages[-1] if messages else None
    if last and last["role"] == "assistant" and last.get("tool_calls") is not None:
        last["tool_calls"].append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _call_output_input(item: dict, where: str, messages: list[dict]) -> None:
    if not item.get("call_id"):
        raise InvalidRequest(f"{where}.call_id is required", field=f"{where}.call_id")
    output = item.get("output")
    messages.append({"role": "tool", "tool_call_id": item["call_id"],
                     "content": output if isinstance(output, str) else json.dumps(output)})


# Each input item type's conversion; earlier reasoning is dropped (templates leave it out of the conversation).
_INPUT_ITEMS = {"message": _message_input, "function_call": _call_input, "function_call_output": _call_output_input,
                "reasoning": lambda item, where, messages: None}


def _responses_tool(i: int, tool) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise InvalidRequest(f"tools[{i}]: only function tools are supported", field=f"tools[{i}].type")
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": fn}


def _responses_chat(body: dict) -> dict:
    """A Responses request -> chat fields (messages, tools, ... as /v1/chat/completions takes them)."""
    unknown = sorted(set(body) - _RESPONSES_TAKEN)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}{compat.closest(unknown[0], tuple(_RESPONSES_TAKEN))}",
                             field=unknown[0])
    if body.get("previous_response_id"):
        raise InvalidRequest("previous_response_id: zinfer's Responses API is stateless; send the whole "
                             "conversation in input", field="previous_response_id")
    chat: dict[str, Any] = {"messages": _responses_messages(body), "stream": bool(body.get("stream"))}
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise InvalidRequest("tools must be a list", field="tools")
        chat["tools"] = [_responses_tool(i, tool) for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    for ours, theirs in (("tool_choice", choice), ("parallel_tool_calls", body.get("parallel_tool_calls")),
                         ("max_tokens", body.get("max_output_tokens")), ("temperature", body.get("temperature")),
                         ("top_p", body.get("top_p")), ("seed", body.get("seed"))):
        if theirs is not None:
            chat[ours] = theirs
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.get("name", "answer"),
                                                                           "schema": fmt.get("schema")}}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    return chat


def _usage_r(usage) -> dict:
    details = usage.completion_tokens_details if usage else None
    return {"input_tokens": usage.prompt_tokens if usage else 0,
            "output_tokens": usage.completion_tokens if usage else 0,
            "total_tokens": usage.total_tokens if usage else 0, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": details.reasoning_tokens if details else 0}}


def _reasoning_item(text: str) -> dict:
    return {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}


def _message_item(text: str, item_id: str | None = None) -> dict:
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex}", "status": "completed",
            "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(call_id: str, name: str, arguments: str, item_id: str | None = None) -> dict:
    return {"type": "function_call", "id": item_id or f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": "completed"}


def _response_obj(rid: str, body: dict, uid: str, msg: p.Chat, output: list, status: str, usage) -> dict:
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": status, "model": uid,
            "output": output, "usage": _usage_r(usage) if usage is not None else None,
            "instructions": body.get("instructions"), "error": None, "incomplete_details": None,
            "metadata": body.get("metadata") or {}, "parallel_tool_calls": msg.options.parallel_tool_calls,
            "temperature": msg.config.temperature, "top_p": msg.config.top_p, "tool_choice": body.get("tool_choice",
                                                                                                   "auto"),
            "tools": body.get("tools") or [], "max_output_tokens": msg.config.max_tokens, "store": False,
            "text": body.get("text") or {"format": {"type": "text"}}, "reasoning": body.get("reasoning"),
            "truncation": "disabled"}


async def responses(gw, request: Request) -> Response:
    body = await body_of(request)
    uid, msg, answer = await _run(gw, request, body, _responses_chat)
    rid = f"resp_{uuid.uuid4().hex}"
    if not msg.config.stream:
        message = answer.choices[0].message
        output = []
        if message.reasoning_content:
            output.append(_reasoning_item(message.reasoning_content))
        if message.content:
            output.append(_message_item(message.content))
        for call in message.tool_calls or []:
            output.append(_call_item(call.id, call.function.name, call.function.arguments))
        status = "incomplete" if answer.choices[0].finish_reason == "length" else "completed"
        return _response(_response_obj(rid, body, uid, msg, output, status, answer.usage))
    return EventStream(_response_events(rid, body, uid, msg, *answer))


class _Items(_Parts):
    """The output items of a streamed Responses reply (reasoning, message, function call), one open at a time,
    each added, filled by deltas and done as OpenAI's stream does."""

    def __init__(self, event):
        self.event, self.output, self.open = event, [], None

    def close(self) -> list[bytes]:
        if self.open is None:
            return []
        item, self.open = self.open, None
        index, event = len(self.output), self.event
        self.output.append(item)
        if item["type"] == "message":
            out = [event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                         text=item["content"][0]["text"], logprobs=[]),
                   event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                         part=item["content"][0])]
        elif item["type"] == "reasoning":
            out = [event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                         text=item["content"][0]["text"])]
        else:
            out = [event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                         name=item["name"], arguments=item["arguments"])]
        return out + [event("response.output_item.done", output_index=index, item=item)]

    def opening(self, kind: str, call=None) -> list[bytes]:
        out, index = self.close(), len(self.output)
        self.open = {"reasoning": lambda: _reasoning_item(""), "message": lambda: _message_item(""),
                     "call": lambda: _call_item(call.id, call.function.name, "")}[kind]()
        out.append(self.event("response.output_item.added", output_index=index,
                              item={**self.open, "status": "in_progress"}))
        if kind == "message":
            out.append(self.event("response.content_part.added", item_id=self.open["id"], output_index=index,
                                  content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return out

    def feed(self, reasoning: str, content: str, call) -> list[bytes]:
        out = []
        for kind, text, name, extra in (("reasoning", reasoning, "response.reasoning_text.delta", {}),
                                        ("message", content, "response.output_text.delta", {"logprobs": []})):
            if text:
                if self.open is None or self.open["type"] != kind:
                    out += self.opening(kind)
                self.open["content"][0]["text"] += text
                out.append(self.event(name, item_id=self.open["id"], output_index=len(self.output),
                                      content_index=0, delta=text, **extra))
        if call is not None:
            if call.id is not None:  # a new call: id and name first
                out += self.opening("call", call)
            if call.function.arguments:
                self.open["arguments"] += call.function.arguments
                out.append(self.event("response.function_call_arguments.delta", item_id=self.open["id"],
                                      output_index=len(self.output), delta=call.function.arguments))
        return out


async def _response_events(rid, body, uid, msg, first, chunks):
    seq = 0

    def event(kind: str, **fields) -> bytes:
        nonlocal seq
        seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + _json.encode({"type": kind, "sequence_number": seq - 1,
                                                                         **fields}) + b"\n\n"

    items = _Items(event)
    yield event("response.created", response=_response_obj(rid, body, uid, msg, [], "in_progress", None))
    yield event("response.in_progress", response=_response_obj(rid, body, uid, msg, [], "in_progress", None))
    try:
        async for e in items.events(first, chunks):
            yield e
        status = "incomplete" if items.finish == "length" else "completed"
        yield event(f"response.{status}",
                    response=_response_obj(rid, body, uid, msg, items.output, status, items.usage))
    except ZinferError as exc:
        yield event("error", code=exc.code, message=str(exc), param=exc.field)


# ---------------------------------------------------------------------------------------------- Messages API

_MESSAGES_TAKEN = {"model", "messages", "system", "max_tokens", "tools", "tool_choice", "stop_sequences",
                   "temperature", "top_p", "top_k", "stream", "thinking", "metadata", "service_tier"}
_STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _messages_turn(where: str, turn, messages: _Messages) -> None:
    """One Messages turn as chat messages: its text, calls and thinking as one message, each tool result as a
    tool message of its own."""
    if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
        raise InvalidRequest(f"{where}.role must be user or assistant", field=f"{where}.role")
    role, content = turn["role"], turn.get("content")
    if isinstance(content, str):
        messages.append({"role": role, "content": content})
        return
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of blocks", field=f"{where}.content")
    texts, calls, thinking, parts, images = [], [], None, [], []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
            parts.append({"type": "text", "text": texts[-1]})
        elif kind == "image" and role == "user":
            images.append((len(parts), at, "source"))
            parts.append({"type": "image_url", "image_url": {"url": _image_source(block.get("source"), at)}})
        elif kind == "tool_use" and role == "assistant":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "tool_result" and role == "user":
            if not block.get("tool_use_id"):
                raise InvalidRequest(f"{at}.tool_use_id is required", field=f"{at}.tool_use_id")
            messages.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                             "content": _text_of(block.get("content"), f"{at}.content", ("text",))})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            thinking = block.get("thinking")
        else:
            raise InvalidRequest(f"{at}: a {kind!r} block is not supported in a {role} message", field=f"{at}.type")
    if len(parts) > len(texts):  # images among the blocks: chat's content parts, in order
        messages.images_of_next(images)
        messages.append({"role": role, "content": parts})
    elif texts or calls:
        messages.append({"role": role, "content": "\n".join(texts) if texts else None,
                         **({"tool_calls": calls} if calls else {}),
                         **({"reasoning_content": thinking} if thinking else {})})


def _image_source(source, at: str) -> str:
    """An Anthropic image block's source (base64 with its media_type, or a url) as an image_url URL."""
    if isinstance(source, dict) and source.get("type") == "base64" and isinstance(source.get("data"), str):
        return f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}"
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return source["url"]
    raise InvalidRequest(f"{at}.source must be {{type: base64, media_type, data}} or {{type: url, url}}",
                         field=f"{at}.source")


def _messages_tool_choice(choice, chat: dict) -> None:
    if isinstance(choice, dict):
        kind = choice.get("type")
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or (
            {"type": "function", "function": {"name": choice.get("name")}} if kind == "tool" else kind)
        if choice.get("disable_parallel_tool_use"):
            chat["parallel_tool_calls"] = False


def _messages_chat(body: dict) -> dict:
    """An Anthropic Messages request -> chat fields."""
    unknown = sorted(set(body) - _MESSAGES_TAKEN)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}{compat.closest(unknown[0], tuple(_MESSAGES_TAKEN))}",
                             field=unknown[0])
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        raise InvalidRequest("max_tokens is required (a positive integer)", field="max_tokens")
    messages = _Messages()
    if body.get("system"):
        messages.append({"role": "system", "content": _text_of(body["system"], "system", ("text",))})
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise InvalidRequest("messages is required: a non-empty list of {role, content}", field="messages")
    for i, turn in enumerate(turns):
        _messages_turn(f"messages[{i}]", turn, messages)
    chat: dict[str, Any] = {"messages": messages, "max_tokens": body["max_tokens"], "stream": bool(body.get("stream"))}
    if body.get("tools"):
        chat["tools"] = [{"type": "function", "function": {
            "name": t.get("name"), **({"description": t["description"]} if t.get("description") else {}),
            "parameters": t.get("input_schema")}} if isinstance(t, dict) else t for t in body["tools"]]
    _messages_tool_choice(body.get("tool_choice"), chat)
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled"):
        chat["chat_template_kwargs"] = {"enable_thinking": thinking["type"] == "enabled"}
    for ours, theirs in (("stop", "stop_sequences"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("top_k", "top_k")):
        if body.get(theirs) is not None:
            chat[ours] = body[theirs]
    return chat


async def messages(gw, request: Request) -> Response:
    body = await body_of(request)
    uid, msg, answer = await _run(gw, request, body, _messages_chat)
    mid = f"msg_{uuid.uuid4().hex}"
    if not msg.config.stream:
        choice = answer.choices[0]
        message = choice.message
        content: list[dict] = []
        if message.reasoning_content:
            content.append({"type": "thinking", "thinking": message.reasoning_content, "signature": ""})
        if message.content:
            content.append({"type": "text", "text": message.content})
        for call in message.tool_calls or []:
            content.append({"type": "tool_use", "id": call.id, "name": call.function.name,
                            "input": json.loads(call.function.arguments)})
        usage = answer.usage
        return _response({"id": mid, "type": "message", "role": "assistant", "model": uid, "content": content,
                          "stop_reason": _STOP_REASON.get(choice.finish_reason or "stop", "end_turn"),
                          "stop_sequence": None, "usage": {"input_tokens": usage.prompt_tokens,
                                                           "output_tokens": usage.completion_tokens}})
    return EventStream(_message_events(mid, uid, *answer))


class _Blocks(_Parts):
    """The content blocks of a streamed Messages reply, one open at a time, started and stopped as Anthropic's
    stream does."""

    def __init__(self, event):
        self.event, self.index, self.kind = event, -1, None

    def start(self, kind: str, block: dict, new: bool = False) -> list[bytes]:
        """Open a block of this kind unless one is open already (`new`: always, as for each tool call)."""
        if self.kind == kind and not new:
            return []
        out = self.close()
        self.index, self.kind = self.index + 1, kind
        return out + [self.event("content_block_start", index=self.index, content_block=block)]

    def delta(self, delta: dict) -> bytes:
        return self.event("content_block_delta", index=self.index, delta=delta)

    def close(self) -> list[bytes]:
        return [self.event("content_block_stop", index=self.index)] if self.kind is not None else []

    def feed(self, reasoning: str, content: str, call) -> list[bytes]:
        out = []
        if reasoning:
            out += self.start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self.delta({"type": "thinking_delta", "thinking": reasoning}))
        if content:
            out += self.start("text", {"type": "text", "text": ""})
            out.append(self.delta({"type": "text_delta", "text": content}))
        if call is not None:
            if call.id is not None:
                out += self.start("tool_use", {"type": "tool_use", "id": call.id, "name": call.function.name,
                                               "input": {}}, new=True)
            if call.function.arguments:
                out.append(self.delta({"type": "input_json_delta", "partial_json": call.function.arguments}))
        return out


async def _message_events(mid, uid, first, chunks):
    def event(kind: str, **fields) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + _json.encode({"type": kind, **fields}) + b"\n\n"

    yield event("message_start", message={"id": mid, "type": "message", "role": "assistant", "model": uid,
                                          "content": [], "stop_reason": None, "stop_sequence": None,
                                          "usage": {"input_tokens": 0, "output_tokens": 0}})
    blocks = _Blocks(event)
    try:
        async for e in blocks.events(first, chunks):
            yield e
        usage = blocks.usage
        yield event("message_delta", delta={"stop_reason": _STOP_REASON.get(blocks.finish or "stop", "end_turn"),
                                            "stop_sequence": None},
                    usage={"input_tokens": usage.prompt_tokens if usage else 0,
                           "output_tokens": usage.completion_tokens if usage else 0})
        yield event("message_stop")
    except ZinferError as exc:
        yield event("error", error={"type": "api_error", "message": str(exc)})

"""Requests as Xinference and OpenAI spell them -> zinfer's structs. Used by the Python client and the HTTP
gateway alike, so both take the same names and forms, and refuse the same things by name.

- launch_request: Xinference's launch arguments (its client's keywords, its REST body): `model_engine`
  (checked against the format), `gpu_idx` as an int, "0,1" or a list, `worker_ip`, `n_gpu`, `replica`, and any
  other keyword as an engine option (typed). Fields zinfer has no use for are taken at their defaults only.
- generate_config: a generate_config dict / the generation fields of an OpenAI request body.
An unknown name is refused with the closest valid one ("did you mean").
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from zinfer.shared import durations
from zinfer.shared import protocol as p
from zinfer.shared.errors import InvalidRequest
from zinfer.shared.images import ImagePolicy, image_bytes
from zinfer.shared.models import closest_name, problem_from_validation
from zinfer.shared.payloads import (
    ChatMessage,
    ChatOptions,
    GenerateConfig,
    ImagePart,
    LoraAdapter,
    TextPart,
    Tool,
    ToolCall,
)

# Xinference's launch fields that mean nothing here: taken at these values (its client sends them), else refused.
_IGNORED_AT = {"n_worker": (1, None), "replica_config": (None,), "enable_thinking": (None,),
               "enable_virtual_env": (None, False), "virtual_env_packages": (None, []),
               "virtual_env_find_links": (None, []), "envs": (None, {}), "wait_ready": (True, False)}
_LAUNCH_FIELDS = ("model_name", "model_type", "model_format", "model_size_in_billions", "quantization", "model_uid",
                  "replica", "n_gpu", "gpu_idx", "devices", "model_engine", "worker_ip", "keep_alive", "restore",
                  "model_path", "peft_model_config")
_ENGINE_OPTIONS = p.EngineOptions.__struct_fields__


closest = closest_name


def _ints(value: Any, field: str) -> list[int] | None:
    """gpu_idx: 0, "0", "0,1", [0, 1], ["0", "1"] -> [0, 1]."""
    if value is None or value == []:
        return None
    items = value if isinstance(value, list | tuple) else str(value).split(",") if isinstance(value, str) else [value]
    out = []
    for item in items:
        if isinstance(item, bool):
            raise InvalidRequest(f"{field} {value!r} must be GPU indexes (0, \"0,1\" or [0, 1])", field=field)
        try:
            number = int(str(item).strip())
        except ValueError:
            raise InvalidRequest(f"{field} {value!r} must be GPU indexes (0, \"0,1\" or [0, 1])",
                                 field=field) from None
        if number < 0:
            raise InvalidRequest(f"{field} {number} must be >= 0", field=field)
        out.append(number)
    return out


def _strings(value: Any, field: str) -> list[str] | None:
    if value is None or value == []:
        return None
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    out = [str(v).strip() for v in items if str(v).strip()]
    if not out:
        raise InvalidRequest(f"{field} {value!r} names nothing", field=field)
    return out


def launch_size(size):
    """A launch's model_size_in_billions as specs write it: 7, or "1_8" for 1.8 billion."""
    if isinstance(size, str) and not _SIZE_RE.match(size.strip()):
        raise InvalidRequest(f"model_size_in_billions {size!r} must be a number of billions (7, 1.8 or 1_8)",
                             field="model_size_in_billions")
    if isinstance(size, bool) or isinstance(size, int | float) and size <= 0:
        raise InvalidRequest(f"model_size_in_billions {size!r} must be a positive number of billions",
                             field="model_size_in_billions")
    if isinstance(size, str):
        size = size.strip()
        return int(size) if size.isdigit() else size.replace(".", "_")
    if isinstance(size, float):
        return int(size) if size.is_integer() else str(size).replace(".", "_")
    return size


def launch_request(model_name: str, **kwargs: Any) -> p.LaunchModel:
    """Xinference's launch keywords -> LaunchModel; raises InvalidRequest naming the argument at fault."""
    fields: dict[str, Any] = {"model_name": model_name}
    engine: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in _IGNORED_AT:
            if value not in _IGNORED_AT[name]:
                raise InvalidRequest(f"{name}={value!r} is not supported by zinfer (leave it at "
                                     f"{_IGNORED_AT[name][0]!r})", field=name)
        elif name in _LAUNCH_FIELDS:
            if value is not None:
                fields[name] = value
        elif name in _ENGINE_OPTIONS:
            if value is not None:
                engine[name] = value
        else:
            raise InvalidRequest(f"unknown launch argument {name!r}{closest(name, _LAUNCH_FIELDS + _ENGINE_OPTIONS)}",
                                 field=name)
    if "gpu_idx" in fields:
        fields["gpu_idx"] = _ints(fields["gpu_idx"], "gpu_idx")
    for name in ("devices", "worker_ip"):
        if name in fields:
            fields[name] = _strings(fields[name], name)
    if "model_size_in_billions" in fields:
        fields["model_size_in_billions"] = launch_size(fields["model_size_in_billions"])
    if "keep_alive" in fields:
        seconds = durations.parse(fields["keep_alive"])
        fields["keep_alive"] = durations.FOREVER if seconds is None else seconds
    n_gpu = fields.get("n_gpu")
    if isinstance(n_gpu, str) and n_gpu.isdigit():
        fields["n_gpu"] = int(n_gpu)
    engine_options(engine)  # checked here too, so a client hears of a typo before anything is sent
    fields["engine_kwargs"] = engine
    try:
        return msgspec.convert(fields, p.LaunchModel)
    except msgspec.ValidationError as exc:
        problem = problem_from_validation(exc, p.LaunchModel)
        raise InvalidRequest(str(problem), field=problem.field or None) from None


def lora_adapter(values: dict) -> LoraAdapter:
    """One LoRA adapter (lora_name, local_path, lora_scale), checked; raises InvalidRequest naming the field."""
    try:
        return msgspec.convert(values, LoraAdapter)
    except msgspec.ValidationError as exc:
        problem = problem_from_validation(exc, LoraAdapter)
        raise InvalidRequest(str(problem), field=problem.field or "lora_name") from None


def engine_options(kwargs: dict) -> p.EngineOptions:
    """A launch's engine options, typed: unknown names refused with the closest valid one, values checked."""
    try:
        return msgspec.convert(kwargs, p.EngineOptions)
    except msgspec.ValidationError as exc:
        problem = problem_from_validation(exc, p.EngineOptions)
        raise InvalidRequest(f"engine option {problem}", field=problem.field or "engine_kwargs") from None


_SIZE_RE = re.compile(r"\A\d+(?:[._]\d+)?\Z")


# OpenAI request fields that zinfer takes at their default values only (anything else is refused by name).
# "user" is informational (any value); max_completion_tokens is OpenAI's newer name for max_tokens.
_GENERATION_IGNORED_AT = {"best_of": (1, None), "logit_bias": (None, {}), "suffix": (None, ""), "user": None,
                          "max_completion_tokens": None}
# A chat's fields beside the sampling settings (chat_options takes them); a generate refuses them by name.
CHAT_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "enable_thinking",
               "add_generation_prompt", "functions", "function_call")
_GENERATION_FIELDS = GenerateConfig.__struct_fields__


def generate_config(values: dict | None) -> GenerateConfig:
    """A generate_config (Xinference) or the generation fields of an OpenAI body -> GenerateConfig."""
    fields: dict[str, Any] = {}
    for name, value in (values or {}).items():
        if name in _GENERATION_FIELDS:
            if value is not None:
                fields[name] = value
        elif name in CHAT_FIELDS:
            if value is not None:
                raise InvalidRequest(f"{name} is for chat, not generate (completions)", field=name)
        elif name in _GENERATION_IGNORED_AT:
            allowed = _GENERATION_IGNORED_AT[name]
            if name == "max_completion_tokens" and value is not None:
                fields.setdefault("max_tokens", value)  # OpenAI's newer name for max_tokens
            elif allowed is not None and value not in allowed:
                raise InvalidRequest(f"{name}={value!r} is not supported by zinfer yet", field=name)
        else:
            raise InvalidRequest(f"unknown generate_config field {name!r}"
                                 f"{closest(name, _GENERATION_FIELDS + tuple(_GENERATION_IGNORED_AT))}", field=name)
    try:
        return msgspec.convert(fields, GenerateConfig)
    except msgspec.ValidationError as exc:
        problem = problem_from_validation(exc, GenerateConfig)
        raise InvalidRequest(str(problem), field=problem.field or "generate_config") from None


class _Part(msgspec.Struct):
    """One part of a message's content list: text or image_url (checked after decoding, by name)."""

    type: str
    text: Any = None
    image_url: Any = None


class _Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Annotated[str, msgspec.Meta(min_length=1)]
    content: str | list[_Part] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's newer name; taken as reasoning_content


class _Chat(msgspec.Struct):
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1)]


def chat_messages(messages: Any, images: ImagePolicy | None = None) -> list[ChatMessage]:
    """Chat messages as OpenAI and Xinference send them -> ChatMessage: content may be a string, a list of
    parts (text parts are joined with newlines; image_url parts are fetched and checked under `images`, the
    policy where the request came in, and kept in order in `parts`) or null (empty)."""
    if messages is None:
        raise InvalidRequest("messages is required: a non-empty list of {role, content}", field="messages")
    try:
        typed = msgspec.convert({"messages": messages}, _Chat)
    except msgspec.ValidationError as exc:
        problem = problem_from_validation(exc, _Chat)
        raise InvalidRequest(str(problem), field=problem.field or "messages") from None
    policy = images or ImagePolicy()
    seen = 0
    out = []
    for i, m in enumerate(typed.messages):
        content, parts = m.content, None
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if part.type == "text" and isinstance(part.text, str):
                    parts.append(TextPart(part.text))
                elif part.type == "image_url":
                    seen += 1
                    if seen > policy.max_images:
                        raise InvalidRequest(f"{where}: more than {policy.max_images} images in one request "
                                             "(max_images)", field=where)
                    url = part.image_url.get("url") if isinstance(part.image_url, dict) else part.image_url
                    parts.append(ImagePart(image_bytes(url, f"{where}.image_url", policy), where))
                else:
                    raise InvalidRequest(f"{where}: text parts ({{'type': 'text', 'text': ...}}) and image_url parts "
                                         f"({{'type': 'image_url', 'image_url': {{'url': ...}}}}) are taken, not "
                                         f"{part.type!r}", field=where)
            content = "\n".join(part.text for part in parts if isinstance(part, TextPart))
            if not any(isinstance(part, ImagePart) for part in parts):
                parts = None
        if m.role == "tool" and not m.tool_call_id:
            raise InvalidRequest(f"messages[{i}]: a tool message needs tool_call_id (the id of the call it "
                                 "answers)", field=f"messages[{i}].tool_call_id")
        for j, call in enumerate(m.tool_calls or ()):
            where = f"messages[{i}].tool_calls[{j}]"
            if not call.function.name:
                raise InvalidRequest(f"{where}.function.name is required", field=f"{where}.function.name")
            if call.function.arguments is None:
                call.function.arguments = "{}"
            if call.id is None:
                call.id = f"call_{i}_{j}"
            call.index = None
        if m.tool_calls and m.role != "assistant":
            raise InvalidRequest(f"messages[{i}]: only assistant messages carry tool_calls",
                                 field=f"messages[{i}].tool_calls")
        out.append(ChatMessage(role=m.role, content="" if content is None and not m.tool_calls else content,
                               name=m.name, tool_calls=m.tool_calls or None, tool_call_id=m.tool_call_id,
                               reasoning_content=m.reasoning_content or m.reasoning, parts=parts))
    return out


def chat_request(uid: str, body: dict, images: ImagePolicy | None = None) -> p.Chat:
    """A chat as OpenAI's and Xinference's bodies (and the client's keywords) give it, its model taken off ->
    Chat: messages (their images under `images`), tools and the template's options, and the sampling settings.
    Takes the fields off `body`."""
    messages = chat_messages(body.pop("messages", None), images)
    options = chat_options(body)
    return p.Chat(model_uid=uid, messages=messages, config=generate_config(body), options=options)


def _schema_problem(schema: Any) -> str | None:
    """What makes `schema` no JSON schema, or None."""
    if not isinstance(schema, dict):
        return f"must be a JSON schema (an object), not {type(schema).__name__}"
    try:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
    except ImportError:  # the schema is still checked when its grammar compiles
        return None
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return f"is not a valid JSON schema: {exc.message}"
    return None


def _tool_names(tools) -> list[str]:
    """A request's tools checked (OpenAI's shape, a schema for each, no two with one name): their names."""
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list of {\"type\": \"function\", \"function\": {...}}", field="tools")
    try:
        typed = msgspec.convert(tools, list[Tool])
    except msgspec.ValidationError as exc:
        problem = problem_from_validation(exc, Tool)
        where = re.sub(r"\A\[(\d+)\]", r"tools[\1]", problem.field or "") or "tools"
        where = where if where.startswith("tools") else f"tools.{where}"
        raise InvalidRequest(f"{where}: {problem.message} (a tool is {{\"type\": \"function\", \"function\": "
                             "{\"name\", \"description\", \"parameters\"}})", field=where) from None
    names = [t.function.name for t in typed]
    for i, tool in enumerate(typed):
        problem = _schema_problem(tool.function.parameters) if tool.function.parameters is not None else None
        if problem:
            where = f"tools[{i}].function.parameters"
            raise InvalidRequest(f"{where} {problem}", field=where)
        if names.index(tool.function.name) != i:
            raise InvalidRequest(f"tools[{i}]: a second tool named {tool.function.name!r}",
                                 field=f"tools[{i}].function.name")
    return names


def _template_kwargs(body: dict) -> dict:
    """chat_template_kwargs (with Xinference's enable_thinking), taken off `body`; never the request's own names."""
    kwargs = body.pop("chat_template_kwargs", None)
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InvalidRequest("chat_template_kwargs must be an object", field="chat_template_kwargs")
    kwargs = dict(kwargs or {})
    thinking = body.pop("enable_thinking", None)  # Xinference's spelling
    if thinking is not None:
        if not isinstance(thinking, bool):
            raise InvalidRequest("enable_thinking must be true or false", field="enable_thinking")
        kwargs.setdefault("enable_thinking", thinking)
    reserved = {"messages", "tools", "add_generation_prompt", "documents"} & set(kwargs)
    if reserved:
        name = sorted(reserved)[0]
        raise InvalidRequest(f"chat_template_kwargs may not set {name!r} (it is the request's own)",
                             field="chat_template_kwargs")
    return kwargs


def chat_options(body: dict) -> ChatOptions:
    """A chat request's tools, tool_choice, parallel_tool_calls, chat_template_kwargs (and Xinference's
    enable_thinking), taken off `body`; InvalidRequest names the field at fault."""
    fields: dict[str, Any] = {}
    names: list[str] = []
    tools = body.pop("tools", None)
    if body.pop("functions", None) is not None or body.pop("function_call", None) is not None:
        raise InvalidRequest("functions / function_call are OpenAI's old names: send tools and tool_choice",
                             field="functions")
    if tools is not None and tools != []:
        names = _tool_names(tools)
        fields["tools"] = tools
    choice = body.pop("tool_choice", None)
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type", "function") == "function" else None
        if not isinstance(name, str) or not name:
            raise InvalidRequest("tool_choice must be none, auto, required or {\"type\": \"function\", "
                                 "\"function\": {\"name\": ...}}", field="tool_choice")
        fields["tool_choice"], fields["tool_choice_named"] = name, True
    elif choice is not None:
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest(f"tool_choice {choice!r} must be none, auto, required or a function object",
                                 field="tool_choice")
        fields["tool_choice"] = choice
    if fields.get("tool_choice") not in (None, "none", "auto") and "tools" not in fields:
        raise InvalidRequest(f"tool_choice {choice!r} needs tools", field="tool_choice")
    if fields.get("tool_choice_named") and fields["tool_choice"] not in names:
        raise InvalidRequest(f"tool_choice names {fields['tool_choice']!r}, which is not among tools {names}",
                             field="tool_choice")
    parallel = body.pop("parallel_tool_calls", None)
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise InvalidRequest("parallel_tool_calls must be true or false", field="parallel_tool_calls")
        fields["parallel_tool_calls"] = parallel
    kwargs = _template_kwargs(body)
    fields["chat_template_kwargs"] = kwargs
    add = body.pop("add_generation_prompt", None)
    if add is not None:
        fields["add_generation_prompt"] = bool(add)
    return ChatOptions(**fields)


class EmbeddingsBody(msgspec.Struct, forbid_unknown_fields=True):
    """OpenAI's embeddings request body (and Xinference's)."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # checked against the model's own once it has answered
    user: str | None = None


def embeddings_body(body: dict) -> EmbeddingsBody:
    """An embeddings request body, typed; InvalidRequest names the field at fault (and the closest known name)."""
    try:
        typed = msgspec.convert(body, EmbeddingsBody)
    except msgspec.ValidationError as exc:
        problem = problem_from_validation(exc, EmbeddingsBody)
        raise InvalidRequest(str(problem), field=problem.field or None) from None
    if isinstance(typed.input, str):
        typed.input = [typed.input]
    return typed


class TextObject(msgspec.Struct, forbid_unknown_fields=True):
    """A document (or query) as Cohere's and Jina's clients may send it: {"text": ...}."""

    text: str


class RerankBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Xinference's rerank request (its client's fields), which takes Cohere's and Jina's where they match:
    documents as strings or {"text": ...} objects, top_n, return_documents."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    query: str | TextObject
    documents: Annotated[list[str | TextObject], msgspec.Meta(min_length=1)]
    top_n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    return_documents: bool | None = None
    return_len: bool | None = None
    max_chunks_per_doc: int | None = None
    kwargs: str | dict[str, Any] | None = None  # xinference-client sends its extra keywords as a JSON string

    @property
    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def message(self) -> p.Rerank:
        query = self.query if isinstance(self.query, str) else self.query.text
        return p.Rerank(model_uid=self.model, query=query, documents=self.texts, top_n=self.top_n)


def rerank_body(body: dict) -> RerankBody:
    """A rerank request body, typed; InvalidRequest names the field at fault."""
    try:
        typed = msgspec.convert(body, RerankBody)
    except msgspec.ValidationError as exc:
        problem = problem_from_validation(exc, RerankBody)
        if problem.field == "documents" and "length" in problem.message:
            raise InvalidRequest("documents must list at least one document", field="documents") from None
        if re.fullmatch(r"documents\[\d+\]", problem.field or "") and problem.message.startswith("Expected"):
            got = problem.message.rpartition("got ")[2] or "something else"
            raise InvalidRequest(f"{problem.field}: a document is a string (or {{\"text\": ...}}), not {got}",
                                 field=problem.field) from None
        raise InvalidRequest(str(problem), field=problem.field or None) from None
    if typed.max_chunks_per_doc is not None:
        raise InvalidRequest("max_chunks_per_doc is not supported (documents are scored whole, truncated at the "
                             "model's max_tokens); leave it out", field="max_chunks_per_doc")
    extra = typed.kwargs
    if isinstance(extra, str):
        try:
            extra = msgspec.json.decode(extra) if extra.strip() else {}
        except msgspec.DecodeError:
            raise InvalidRequest("kwargs is not valid JSON", field="kwargs") from None
    if extra:
        names = sorted(extra) if isinstance(extra, dict) else [repr(extra)]
        raise InvalidRequest(f"kwargs: zinfer's rerank takes no extra arguments ({', '.join(names)})",
                             field="kwargs")
    typed.return_documents = bool(typed.return_documents)
    typed.return_len = bool(typed.return_len)
    return typed

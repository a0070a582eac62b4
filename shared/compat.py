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
from zinfer.shared.models import closest_name, problem_from_validation
from zinfer.shared.payloads import ChatMessage, GenerateConfig

# Xinference's launch fields that mean nothing here: taken at these values (its client sends them), else refused.
_IGNORED_AT = {"n_worker": (1, None), "peft_model_config": (None,),
               "replica_config": (None,), "model_path": (None,), "enable_thinking": (None,),
               "enable_virtual_env": (None, False), "virtual_env_packages": (None, []),
               "virtual_env_find_links": (None, []), "envs": (None, {}), "wait_ready": (True, False)}
_LAUNCH_FIELDS = ("model_name", "model_type", "model_format", "model_size_in_billions", "quantization", "model_uid",
                  "replica", "n_gpu", "gpu_idx", "devices", "model_engine", "worker_ip", "keep_alive", "restore")
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
    size = fields.get("model_size_in_billions")
    if isinstance(size, str) and not _SIZE_RE.match(size.strip()):
        raise InvalidRequest(f"model_size_in_billions {size!r} must be a number of billions (7, 1.8 or 1_8)",
                             field="model_size_in_billions")
    if isinstance(size, bool) or isinstance(size, int | float) and size <= 0:
        raise InvalidRequest(f"model_size_in_billions {size!r} must be a positive number of billions",
                             field="model_size_in_billions")
    if isinstance(size, str):
        size = size.strip()
        fields["model_size_in_billions"] = int(size) if size.isdigit() else size.replace(".", "_")
    elif isinstance(size, float):
        fields["model_size_in_billions"] = int(size) if size.is_integer() else str(size).replace(".", "_")
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
                          "tools": (None, []), "tool_choice": (None, "none", "auto"),
                          "parallel_tool_calls": (None, True, False), "chat_template_kwargs": (None, {}),
                          "max_completion_tokens": None}
_GENERATION_FIELDS = GenerateConfig.__struct_fields__


def generate_config(values: dict | None) -> GenerateConfig:
    """A generate_config (Xinference) or the generation fields of an OpenAI body -> GenerateConfig."""
    fields: dict[str, Any] = {}
    for name, value in (values or {}).items():
        if name in _GENERATION_FIELDS:
            if value is not None:
                fields[name] = value
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
    """One part of a message's content list; only text parts are taken (checked after decoding, by name)."""

    type: str
    text: Any = None


class _Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Annotated[str, msgspec.Meta(min_length=1)]
    content: str | list[_Part] | None = None
    name: str | None = None


class _Chat(msgspec.Struct):
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1)]


def chat_messages(messages: Any) -> list[ChatMessage]:
    """Chat messages as OpenAI and Xinference send them -> ChatMessage: content may be a string, a list of
    parts (text parts are joined with newlines; other kinds are refused by name) or null (empty)."""
    if messages is None:
        raise InvalidRequest("messages is required: a non-empty list of {role, content}", field="messages")
    try:
        typed = msgspec.convert({"messages": messages}, _Chat)
    except msgspec.ValidationError as exc:
        problem = problem_from_validation(exc, _Chat)
        raise InvalidRequest(str(problem), field=problem.field or "messages") from None
    out = []
    for i, m in enumerate(typed.messages):
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or not isinstance(part.text, str):
                    where = f"messages[{i}].content[{j}]"
                    raise InvalidRequest(f"{where}: only text parts ({{'type': 'text', 'text': ...}}) are "
                                         f"supported, not {part.type!r}", field=where)
            content = "\n".join(part.text for part in content)
        out.append(ChatMessage(role=m.role, content=content or "", name=m.name))
    return out


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

"""Requests as Xinference and OpenAI spell them -> zinfer's structs. Used by the Python client and the HTTP
gateway alike, so both take the same names and forms, and refuse the same things by name.

- launch_request: Xinference's launch arguments (its client's keywords, its REST body): `model_engine`
  (checked against the format), `gpu_idx` as an int, "0,1" or a list, `worker_ip`, `n_gpu`, `replica`, and any
  other keyword as an engine option (typed). Fields zinfer has no use for are taken at their defaults only.
- generate_config: a generate_config dict / the generation fields of an OpenAI request body.
An unknown name is refused with the closest valid one ("did you mean").
"""

from __future__ import annotations

import difflib
from typing import Any

import msgspec

from shared import protocol as p
from shared.errors import InvalidRequest

# Xinference's launch fields that mean nothing here: taken at these values (its client sends them), else refused.
_IGNORED_AT = {"n_worker": (1, None), "peft_model_config": (None,), "request_limits": (None,),
               "replica_config": (None,), "model_path": (None,), "enable_thinking": (None,),
               "enable_virtual_env": (None, False), "virtual_env_packages": (None, []),
               "virtual_env_find_links": (None, []), "envs": (None, {}), "wait_ready": (True, False)}
_LAUNCH_FIELDS = ("model_name", "model_type", "model_format", "model_size_in_billions", "quantization", "model_uid",
                  "replica", "n_gpu", "gpu_idx", "devices", "model_engine", "worker_ip")
_ENGINE_OPTIONS = p.EngineOptions.__struct_fields__


def closest(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


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
    if isinstance(size, float):
        fields["model_size_in_billions"] = int(size) if size.is_integer() else str(size).replace(".", "_")
    elif isinstance(size, str) and size.isdigit():
        fields["model_size_in_billions"] = int(size)
    n_gpu = fields.get("n_gpu")
    if isinstance(n_gpu, str) and n_gpu.isdigit():
        fields["n_gpu"] = int(n_gpu)
    fields["engine_kwargs"] = engine
    try:
        return msgspec.convert(fields, p.LaunchModel)
    except msgspec.ValidationError as exc:
        from shared.models import problem_from_validation

        problem = problem_from_validation(exc)
        raise InvalidRequest(str(problem), field=problem.field or None) from None


# OpenAI request fields that zinfer takes at their default values only (anything else is refused by name).
_GENERATION_IGNORED_AT = {"n": (1, None), "best_of": (1, None), "echo": (False, None), "logprobs": (None, False, 0),
                          "top_logprobs": (None, 0), "presence_penalty": (0, 0.0, None),
                          "frequency_penalty": (0, 0.0, None), "logit_bias": (None, {}), "suffix": (None, ""),
                          "user": None, "stream_options": None, "response_format": (None, {"type": "text"}),
                          "tools": (None, []), "tool_choice": (None, "none", "auto"),
                          "parallel_tool_calls": (None, True, False), "chat_template_kwargs": (None, {}),
                          "max_completion_tokens": None}
_GENERATION_FIELDS = p.GenerateConfig.__struct_fields__


def generate_config(values: dict | None) -> p.GenerateConfig:
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
        return msgspec.convert(fields, p.GenerateConfig)
    except msgspec.ValidationError as exc:
        from shared.models import problem_from_validation

        problem = problem_from_validation(exc)
        raise InvalidRequest(str(problem), field=problem.field or "generate_config") from None

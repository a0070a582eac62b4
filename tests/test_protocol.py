"""Codec round trips and the completeness of the message unions."""

import typing

import msgspec
import pytest

from zinfer.shared import instances, wire
from zinfer.shared import protocol as p
from zinfer.shared.payloads import (
    ChatCompletionMessage,
    ChatDeltaChoice,
    ChatMessage,
    CompletionChoice,
    GenerateConfig,
    Usage,
)


def _members(union) -> set[type]:
    return set(typing.get_args(union))


def test_every_message_is_in_exactly_one_union():
    """Every Msg subclass, in whichever shared module it is defined, is a request or a reply (not both); a base
    named with a leading underscore holds shared fields and is never sent."""
    import importlib
    import pkgutil

    import zinfer.shared

    for module in pkgutil.iter_modules(zinfer.shared.__path__):
        importlib.import_module(f"zinfer.shared.{module.name}")
    requests, replies = _members(p.Request), _members(p.Reply)
    assert not requests & replies
    defined, todo = set(), [p.Msg]
    while todo:
        for sub in todo.pop().__subclasses__():
            if not sub.__name__.startswith("_"):
                defined.add(sub)
            todo.append(sub)
    assert defined == requests | replies


def test_every_request_has_its_reply():
    requests, replies = _members(p.Request), _members(p.Reply)
    assert set(p.REPLY_OF) == requests
    for request, expected in p.REPLY_OF.items():
        assert set(expected) <= replies, request


def test_tags_are_unique():
    tags = [cls.__struct_config__.tag for cls in _members(p.Request) | _members(p.Reply)]
    assert len(tags) == len(set(tags))


@pytest.mark.parametrize("msg", [
    p.Ping(payload=b"x"),
    p.RegisterModel(model_type="LLM", model="{}", persist=True),
    p.LaunchModel(model_name="m", replica=2, gpu_idx=[0], engine_kwargs={"a": 1, "b": "x"}),
    p.Generate(model_uid="u", prompt="hi", config=GenerateConfig(max_tokens=3, stop=["x"], stream=True)),
    p.Chat(model_uid="u", messages=[ChatMessage(role="user", content="hi")]),
    p.Embed(model_uid="u", input=["a", "b"]),
    p.WorkerReport(device=instances.DeviceInfo(worker_id="cpu", host="h", device="cpu", total_memory=1, free_memory=1)),
])
def test_request_round_trip(msg):
    assert p.decode_request(p.encode(msg)) == msg


@pytest.mark.parametrize("msg", [
    p.Error(code="invalid", message="bad", field="model_name"),
    p.Completion(id="cmpl-1", created=1, model="u", choices=[CompletionChoice(text="t", finish_reason="stop")],
                 usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)),
    p.ChatCompletionChunk(id="c", created=1, model="u",
                          choices=[ChatDeltaChoice(delta=ChatCompletionMessage(role=None, content="x"))]),
    p.Embedding(model="u", rows=2, dimensions=3, prompt_tokens=4),
])
def test_reply_round_trip(msg):
    assert p.decode_reply(p.encode(msg)) == msg


def test_a_request_body_is_not_a_reply():
    with pytest.raises(p.Undecodable):
        p.decode_reply(p.encode(p.Ping()))


def test_every_request_names_the_roles_that_may_send_it():
    assert set(p.ALLOWED_ROLES) == _members(p.Request)
    for request, roles in p.ALLOWED_ROLES.items():
        assert roles and roles <= set(p.ROLES), request
    # What a user key may never do, and what only services send.
    for admin_only in (p.RegisterModel, p.UnregisterModel, p.LaunchModel, p.TerminateModel):
        assert p.ALLOWED_ROLES[admin_only] == {p.ADMIN}
    for internal in (p.WorkerReport, p.LoadInstance, p.UnloadInstance):
        assert p.ALLOWED_ROLES[internal] == {p.SERVICE}


def nested_bomb(depth: int = 100_000) -> bytes:
    """A LoadInstance whose `llm.v2_extras` (a dict[str, Any]) holds lists nested `depth` deep: ~100 KB that made
    msgspec raise RecursionError, which used to escape the service loop."""
    family = {"version": 1, "model_name": "m", "model_lang": ["en"], "model_ability": ["chat"],
              "model_specs": [], "v2_extras": {"x": "PLACEHOLDER"}}
    body = msgspec.msgpack.encode({"op": "LoadInstance", "model_uid": "u", "model_type": "LLM", "llm": family})
    return body.replace(msgspec.msgpack.encode("PLACEHOLDER"), b"\x91" * depth + b"\xc0")


def test_hostile_bodies_raise_undecodable_only():
    with pytest.raises(RecursionError):  # what the raw decoder does with it
        msgspec.msgpack.Decoder(p.Request).decode(nested_bomb())
    for hostile in (nested_bomb(), b"\x91" * 100_000 + b"\xc0", b"\xff" * 10, p.encode(p.Ping())[:-1], b""):
        with pytest.raises(p.Undecodable):
            p.decode_request(hostile)


def test_callers_round_trip():
    stamp = p.caller_stamp(p.SERVICE, "worker/cpu:1")
    assert p.parse_caller(stamp) == p.Caller("service", "worker/cpu:1")


def test_frames_carry_the_protocol_version():
    frames = wire.client_request(b"registry", b"id", b"body")
    assert frames[0] == wire.REQUEST and frames[0].startswith(wire.PROTO)
    assert wire.peer_reply(b"c", b"id", b"b", final=False)[0] == wire.PARTIAL
    assert wire.peer_ready("registry", ["m"]) == [wire.READY, b"registry", b"m"]


def test_every_error_code_has_its_exception_and_http_status():
    """A code the wire may carry that the client would read as InternalError, or the gateway answer as 500, is a
    bug: one class per code, one status per code."""
    from zinfer.services.gateway.app import STATUS
    from zinfer.shared.errors import _BY_CODE, InternalError, NoRoute, QueueFull, Unavailable, error_class
    from zinfer.shared.message import ErrorCode

    codes = set(typing.get_args(ErrorCode))
    assert codes == set(_BY_CODE) == set(STATUS)
    assert all(error_class(code).code == code for code in codes) and error_class("nonsense") is InternalError
    assert issubclass(NoRoute, Unavailable) and issubclass(QueueFull, Unavailable)
    assert STATUS["queue_full"] == 429 and STATUS["no_route"] == 503

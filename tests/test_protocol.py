"""Codec round trips and the completeness of the message unions."""

import typing

import msgspec
import pytest

from shared import protocol as p


def _members(union) -> set[type]:
    return set(typing.get_args(union))


def test_every_message_is_in_exactly_one_union():
    requests, replies = _members(p.Request), _members(p.Reply)
    assert not requests & replies
    defined = {cls for cls in vars(p).values()
               if isinstance(cls, type) and issubclass(cls, p.Msg) and cls is not p.Msg}
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
    p.Generate(model_uid="u", prompt="hi", config=p.GenerateConfig(max_tokens=3, stop=["x"], stream=True)),
    p.Chat(model_uid="u", messages=[p.ChatMessage(role="user", content="hi")]),
    p.Embed(model_uid="u", input=["a", "b"]),
    p.WorkerReport(device=p.DeviceInfo(worker_id="cpu", host="h", device="cpu", total_memory=1, free_memory=1)),
])
def test_request_round_trip(msg):
    assert p.decode_request(p.encode(msg)) == msg


@pytest.mark.parametrize("msg", [
    p.Error(code="invalid", message="bad", field="model_name"),
    p.Completion(id="cmpl-1", created=1, model="u", choices=[p.CompletionChoice(text="t", finish_reason="stop")],
                 usage=p.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)),
    p.ChatCompletionChunk(id="c", created=1, model="u",
                          choices=[p.ChatDeltaChoice(delta=p.ChatCompletionMessage(role=None, content="x"))]),
    p.Embedding(model="u", rows=2, dimensions=3, prompt_tokens=4),
])
def test_reply_round_trip(msg):
    assert p.decode_reply(p.encode(msg)) == msg


def test_a_request_body_is_not_a_reply():
    with pytest.raises(msgspec.ValidationError):
        p.decode_reply(p.encode(p.Ping()))


def test_frames_carry_the_protocol_version():
    frames = p.client_request(b"registry", b"id", b"body")
    assert frames[0] == p.REQUEST and frames[0].startswith(p.PROTO)
    assert p.peer_reply(b"c", b"id", b"b", final=False)[0] == p.PARTIAL
    assert p.peer_ready("registry", ["m"]) == [p.READY, b"registry", b"m"]

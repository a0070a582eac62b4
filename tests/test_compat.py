"""Xinference's and OpenAI's request shapes -> typed messages, without a mesh: what is taken, what is refused
and the field each refusal names."""

from __future__ import annotations

import pytest

from zinfer.shared import compat
from zinfer.shared.errors import InvalidRequest
from zinfer.shared.payloads import ChatMessage


def test_launch_keywords_become_a_typed_launch():
    msg = compat.launch_request("m", model_format="ggufv2", model_size_in_billions="1.8", gpu_idx="0,1", n_gpu="2",
                                n_ctx=512, model_uid=None)
    assert (msg.model_format, msg.model_size_in_billions, msg.gpu_idx, msg.n_gpu) == ("ggufv2", "1_8", [0, 1], 2)
    assert msg.engine_kwargs == {"n_ctx": 512} and msg.model_uid is None


@pytest.mark.parametrize(("kwargs", "field", "text"), [
    ({"model_formt": "x"}, "model_formt", "did you mean 'model_format'"),
    ({"model_size_in_billions": "seven"}, "model_size_in_billions", "number of billions"),
    ({"model_size_in_billions": 0}, "model_size_in_billions", "positive"),
    ({"replica": "two"}, "replica", "Expected `int`"),
])
def test_bad_launch_keywords_name_their_field(kwargs, field, text):
    with pytest.raises(InvalidRequest, match=text) as err:
        compat.launch_request("m", **kwargs)
    assert err.value.field == field


def test_generate_config_takes_openai_names_and_refuses_unknown_ones():
    config = compat.generate_config({"max_completion_tokens": 5, "temperature": 0, "user": "u", "stop": None})
    assert (config.max_tokens, config.temperature, config.stop) == (5, 0, None)
    with pytest.raises(InvalidRequest, match="did you mean 'temperature'") as err:
        compat.generate_config({"temprature": 1})
    assert err.value.field == "temprature"
    with pytest.raises(InvalidRequest) as err:
        compat.generate_config({"top_p": 2})
    assert err.value.field == "top_p"


def test_chat_messages_join_text_parts_and_take_null_content():
    out = compat.chat_messages([{"role": "system", "content": None},
                                {"role": "user", "content": [{"type": "text", "text": "a"},
                                                             {"type": "text", "text": "b"}], "name": "bob"}])
    assert out == [ChatMessage(role="system", content=""), ChatMessage(role="user", content="a\nb", name="bob")]


@pytest.mark.parametrize(("messages", "field", "text"), [
    (None, "messages", "required"),
    ([], "messages", "length >= 1"),
    ("hi", "messages", "Expected `array`"),
    ([{"content": "x"}], "messages[0].role", "required field is missing"),
    ([{"role": "", "content": "x"}], "messages[0].role", "length >= 1"),
    ([{"role": "user", "content": 5}], "messages[0].content", "Expected"),
    ([{"role": "user", "contnet": "x"}], "messages[0].contnet", "did you mean 'content'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0].image_url",
     "must be a data URI or a URL"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "messages[0].content[0]",
     "text parts .* and image_url parts"),
])
def test_bad_chat_messages_name_their_field(messages, field, text):
    with pytest.raises(InvalidRequest, match=text) as err:
        compat.chat_messages(messages)
    assert err.value.field == field


def test_an_embeddings_body_is_typed():
    body = compat.embeddings_body({"model": "emb", "input": "one", "user": "u"})
    assert (body.model, body.input, body.encoding_format, body.dimensions) == ("emb", ["one"], "float", None)
    assert compat.embeddings_body({"model": "emb", "input": ["a", "b"], "encoding_format": "base64",
                                   "dimensions": 384}).input == ["a", "b"]


@pytest.mark.parametrize(("body", "field", "text"), [
    ({"model": "emb"}, "input", "required field is missing"),
    ({"model": "emb", "input": [1]}, "input[0]", "Expected `str`"),
    ({"model": "emb", "input": "x", "encoding_format": "int8"}, "encoding_format", "valid values: base64, float"),
    ({"model": "emb", "input": "x", "inputs": "y"}, "inputs", "did you mean 'input'"),
])
def test_bad_embeddings_bodies_name_their_field(body, field, text):
    with pytest.raises(InvalidRequest, match=text) as err:
        compat.embeddings_body(body)
    assert err.value.field == field

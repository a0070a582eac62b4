"""Chat as today's clients chat, through the gateway, on both engines: tool calls (unary, streamed, tool_choice),
reasoning, the model's own template, structured output, the Responses and Messages APIs, with the real openai,
anthropic and xinference-client packages. The model is the tiny tool-calling Llama of shared/tinytools.py (trained
until greedy decoding gives its answers), registered in Xinference's v2 JSON without tool_parser or chat_template;
prompt token counts are compared with transformers' own apply_chat_template in this process."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest
import requests
from transformers import AutoTokenizer
from xinference_client import RESTfulClient

from tests.conftest import served_mesh
from zinfer.shared import tinytools as tt

ENGINES = {"tt": dict(model_name="tool-llama", model_format="pytorch"),
           "tg": dict(model_name="tool-llama-gguf", model_format="ggufv2", quantization="F32")}
WEATHER = [{"role": "user", "content": tt.WEATHER_Q}]
AFTER_CALL = [{"role": "user", "content": tt.WEATHER_Q},
              {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                  "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": tt.SUNNY}]
GREEDY = {"temperature": 0}  # anthropic 2.x sends no temperature of its own
ANSWER_SCHEMA = {"type": "object", "properties": {
    "animal": {"type": "string", "enum": ["whale", "octopus", "fox"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 99},
    "big": {"type": "boolean"},
    "name": {"type": "string", "maxLength": 8}}, "required": ["animal", "count", "big", "name"],
    "additionalProperties": False}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, tiny_models):
    with served_mesh(tmp_path_factory, tiny_models, "tools", ["hf", "gg"], gateway=True) as m:
        c = m.client
        c.register_model("LLM", tt.registration("tool-llama", tiny_models["tools_pytorch"]))
        c.register_model("LLM", tt.gguf_registration("tool-llama-gguf", tiny_models["tools_gguf"]))
        for uid, args in ENGINES.items():
            c.launch_model(model_uid=uid, **args)
        m.tok = AutoTokenizer.from_pretrained(str(tiny_models["tools_pytorch"]))
        yield m


def oai(m) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{m.gateway_url}/v1", api_key=m.admin_api_key, max_retries=0, timeout=60)


def prompt_tokens(m, messages, tools=None, **kwargs) -> int:
    return len(token_ids(m, messages, tools, **kwargs))


def token_ids(m, messages, tools=None, **kwargs) -> list[int]:
    """What transformers' own apply_chat_template makes of these messages (arguments as objects, as zinfer hands
    them to templates)."""
    plain = []
    for msg in messages:
        msg = dict(msg)
        if msg.get("tool_calls"):
            msg["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(
                c["function"]["arguments"])}} for c in msg["tool_calls"]]
        plain.append(msg)
    return list(m.tok.apply_chat_template(plain, tools=tools, add_generation_prompt=True, tokenize=True,
                                          return_dict=False, **kwargs))


def post(m, path: str, body: dict) -> requests.Response:
    return requests.post(f"{m.gateway_url}{path}", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {m.admin_api_key}"})


@pytest.mark.parametrize("uid", ENGINES)
def test_a_weather_question_is_a_tool_call(gw, uid):
    out = oai(gw).chat.completions.create(model=uid, messages=WEATHER, tools=tt.TOOLS, temperature=0, max_tokens=60)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert out.usage.prompt_tokens == prompt_tokens(gw, WEATHER, tt.TOOLS)


@pytest.mark.parametrize("uid", ENGINES)
def test_a_streamed_tool_call_assembles_from_its_deltas(gw, uid):
    stream = oai(gw).chat.completions.create(model=uid, messages=WEATHER, tools=tt.TOOLS, temperature=0,
                                             max_tokens=60, stream=True)
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            if piece.id:
                assert call["id"] is None and not call["arguments"]  # id and name come first
                call["id"], call["name"] = piece.id, piece.function.name
            call["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == ""
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize("uid", ENGINES)
def test_a_tool_result_is_answered_in_text(gw, uid):
    out = oai(gw).chat.completions.create(model=uid, messages=AFTER_CALL, tools=tt.TOOLS, temperature=0,
                                          max_tokens=40)
    assert out.choices[0].message.content == tt.SUNNY_A
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == prompt_tokens(gw, AFTER_CALL, tt.TOOLS)


@pytest.mark.parametrize("uid", ENGINES)
def test_reasoning_is_split_from_the_answer(gw, uid):
    messages = [{"role": "user", "content": tt.THINK_Q}]
    out = oai(gw).chat.completions.create(model=uid, messages=messages, temperature=0, max_tokens=40)
    message = out.choices[0].message
    assert message.content == tt.THINK_A
    assert message.reasoning_content == tt.THINK_R and message.model_extra["reasoning"] == tt.THINK_R
    assert out.usage.completion_tokens_details.reasoning_tokens > 0
    reasoning, content = "", ""
    for chunk in oai(gw).chat.completions.create(model=uid, messages=messages, temperature=0, max_tokens=40,
                                                 stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            extra = delta.model_extra or {}
            reasoning += extra.get("reasoning_content") or ""
            assert not (content and extra.get("reasoning_content")), "reasoning deltas come first"
            content += delta.content or ""
    assert (reasoning, content) == (tt.THINK_R, tt.THINK_A)


@pytest.mark.parametrize("uid", ENGINES)
def test_enable_thinking_false_renders_the_closed_block(gw, uid):
    messages = [{"role": "user", "content": tt.THINK_Q}]
    out = oai(gw).chat.completions.create(model=uid, messages=messages, temperature=0, max_tokens=40,
                                          extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert out.choices[0].message.content == tt.THINK_A
    assert out.choices[0].message.model_extra.get("reasoning_content") is None
    assert out.usage.prompt_tokens == prompt_tokens(gw, messages, enable_thinking=False)
    xin = post(gw, "/v1/chat/completions", {"model": uid, "messages": messages, "temperature": 0, "max_tokens": 40,
                                            "enable_thinking": False}).json()  # Xinference's spelling
    assert xin["choices"][0]["message"]["content"] == tt.THINK_A


@pytest.mark.parametrize("uid", ENGINES)
def test_tool_choice_none_leaves_the_text_alone(gw, uid):
    out = oai(gw).chat.completions.create(model=uid, messages=WEATHER, tools=tt.TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=60)
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].message.content == tt.WEATHER_CALL and out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("uid", ENGINES)
def test_required_and_named_tool_choice_force_a_valid_call(gw, uid):
    hello = [{"role": "user", "content": tt.HELLO}]
    free = oai(gw).chat.completions.create(model=uid, messages=hello, tools=tt.TOOLS, temperature=0, max_tokens=60)
    assert free.choices[0].message.content == tt.HELLO_A  # answered in text when free to
    for choice, name in (("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")):
        out = oai(gw).chat.completions.create(model=uid, messages=hello, tools=tt.TOOLS, tool_choice=choice,
                                              temperature=0, max_tokens=120)
        calls = out.choices[0].message.tool_calls
        assert calls and out.choices[0].finish_reason == "tool_calls", out.choices[0]
        tool = {t["function"]["name"]: t for t in tt.TOOLS}[calls[0].function.name]
        assert name is None or calls[0].function.name == name
        jsonschema.validate(json.loads(calls[0].function.arguments), tool["function"]["parameters"])


@pytest.mark.parametrize("uid", ["hf", "gg"])
def test_json_schema_output_validates_on_a_random_model(gw, uid):
    for stream in (False, True):
        body = dict(model=uid, messages=[{"role": "user", "content": "An animal, please."}], temperature=0,
                    max_tokens=120, response_format={"type": "json_schema", "json_schema": {
                        "name": "animal", "schema": ANSWER_SCHEMA}})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in oai(gw).chat.completions.create(
                **body, stream=True) if c.choices)
        else:
            text = oai(gw).chat.completions.create(**body).choices[0].message.content
        jsonschema.validate(json.loads(text), ANSWER_SCHEMA)
    # The counters come with the instance's reports, a moment after each request: wait until they show the schema
    # compiled (once), then until they show the next request too.
    stats = lambda: gw.client.describe_model(uid)["stats"]  # noqa: E731
    gw.wait(lambda: stats().get("grammars_compiled") == 1, timeout=30)
    requests_before = stats()["requests"]
    oai(gw).chat.completions.create(**body)
    gw.wait(lambda: stats()["requests"] > requests_before, timeout=30)
    assert stats()["grammars_compiled"] == 1  # the same schema again: nothing compiled
    for field, value, check in (("guided_regex", "[0-9]{3}-[a-z]{2}", r"\d{3}-[a-z]{2}"),
                                ("guided_choice", ["whale", "octopus"], None),
                                ("guided_grammar", 'root ::= "yes" | "no" | "maybe"', r"yes|no|maybe")):
        out = post(gw, "/v1/chat/completions", {"model": uid, "messages": [{"role": "user", "content": "Hi"}],
                                                "temperature": 0, "max_tokens": 20, field: value}).json()
        text = out["choices"][0]["message"]["content"]
        assert (text in value) if check is None else __import__("re").fullmatch(check, text), text


def test_xinference_client_chat_with_tools(gw):
    model = RESTfulClient(gw.gateway_url, api_key=gw.admin_api_key).get_model("tg")
    out = model.chat(messages=WEATHER, tools=tt.TOOLS, generate_config={"temperature": 0, "max_tokens": 60})
    [call] = out["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize("uid", ENGINES)
def test_anthropic_messages_give_a_tool_use_block(gw, uid):
    client = anthropic.Anthropic(base_url=gw.gateway_url, api_key=gw.admin_api_key, max_retries=0, timeout=60)
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in tt.TOOLS]
    out = client.messages.create(model=uid, max_tokens=60, messages=WEATHER, tools=tools, extra_body=GREEDY)
    assert out.stop_reason == "tool_use"
    [block] = out.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}
    answer = client.messages.create(model=uid, max_tokens=40, tools=tools, extra_body=GREEDY, messages=[
        *WEATHER, {"role": "assistant", "content": [{"type": "tool_use", "id": block.id, "name": block.name,
                                                     "input": block.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": tt.SUNNY}]}])
    assert answer.content[0].text == tt.SUNNY_A and answer.stop_reason == "end_turn"
    with client.messages.stream(model=uid, max_tokens=40, extra_body=GREEDY,
                                messages=[{"role": "user", "content": tt.THINK_Q}]) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == tt.THINK_R and final.content[1].text == tt.THINK_A


@pytest.mark.parametrize("uid", ENGINES)
def test_openai_responses_give_a_function_call_item(gw, uid):
    tools = [{"type": "function", **t["function"]} for t in tt.TOOLS]
    out = oai(gw).responses.create(model=uid, input=tt.WEATHER_Q, tools=tools, temperature=0, max_output_tokens=60)
    [item] = out.output
    assert item.type == "function_call" and item.name == "get_weather"
    assert json.loads(item.arguments) == {"city": "Paris"}
    follow = oai(gw).responses.create(model=uid, tools=tools, temperature=0, max_output_tokens=40, input=[
        {"role": "user", "content": tt.WEATHER_Q},
        {"type": "function_call", "call_id": item.call_id, "name": item.name, "arguments": item.arguments},
        {"type": "function_call_output", "call_id": item.call_id, "output": tt.SUNNY}])
    assert follow.output_text == tt.SUNNY_A
    events = list(oai(gw).responses.create(model=uid, input=tt.THINK_Q, temperature=0, max_output_tokens=40,
                                           stream=True))
    done = events[-1]
    assert done.type == "response.completed"
    assert [i.type for i in done.response.output] == ["reasoning", "message"]
    assert done.response.output_text == tt.THINK_A


@pytest.mark.parametrize("uid", ENGINES)
def test_render_gives_the_prompt_and_its_tokens(gw, uid):
    out = post(gw, "/v1/chat/render", {"model": uid, "messages": AFTER_CALL, "tools": tt.TOOLS}).json()
    assert out["token_ids"] == token_ids(gw, AFTER_CALL, tt.TOOLS)  # llama.cpp's GGUF tokenizes as transformers
    assert out["template_source"] == "model"
    assert out["prompt"].endswith("<|im_start|>assistant\n") and "<tool_response>" in out["prompt"]
    via_client = gw.client.get_model(uid).render_chat(AFTER_CALL, tt.TOOLS)
    assert via_client["prompt"] == out["prompt"] and via_client["token_ids"] == out["token_ids"]


def test_an_unknown_tool_parser_is_refused_at_registration_with_the_valid_names(gw, tiny_models):
    from zinfer.shared.errors import InvalidRequest

    definition = tt.registration("bad-parser", tiny_models["tools_pytorch"])
    definition["tool_parser"] = "glm9"
    with pytest.raises(InvalidRequest, match="hermes") as err:
        gw.client.register_model("LLM", definition)
    assert err.value.field == "tool_parser"
    definition["tool_parser"] = "qwen"  # Xinference's name for the Hermes format
    gw.client.register_model("LLM", {**definition, "model_name": "qwen-parser"})
    gw.client.unregister_model("LLM", "qwen-parser")


BAD = [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "tools[0].function.parameters"),
    ({"tools": tt.TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(?<=a)b"}}}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]},
     "messages[1].tool_call_id"),
    ({"tool_choice": "required"}, "tool_choice"),
]


@pytest.mark.parametrize("extra,field", BAD, ids=[b[1] for b in BAD])
def test_bad_chat_input_is_a_400_naming_the_field(gw, extra, field):
    body = {"model": "tt", "messages": WEATHER, "max_tokens": 5, **extra}
    out = post(gw, "/v1/chat/completions", body)
    assert out.status_code == 400, out.text
    assert out.json()["error"]["param"] == field, out.json()
    ok = oai(gw).chat.completions.create(model="tt", messages=WEATHER, tools=tt.TOOLS, temperature=0, max_tokens=60)
    assert ok.choices[0].message.tool_calls  # still serving


def test_a_template_that_raises_is_a_400_naming_messages(gw):
    definition = tt.registration("raising-tools", gw.tok.name_or_path)
    definition["chat_template"] = "{{ raise_exception('no system messages, please') if messages[0].role == " \
                                  "'system' else messages[0].content }}"
    gw.client.register_model("LLM", definition)
    gw.client.launch_model(model_name="raising-tools", model_uid="raising", model_format="pytorch")
    try:
        out = post(gw, "/v1/chat/completions", {"model": "raising", "max_tokens": 5, "messages": [
            {"role": "system", "content": "x"}, {"role": "user", "content": "y"}]})
        assert out.status_code == 400 and out.json()["error"]["param"] == "messages"
        assert "no system messages, please" in out.json()["error"]["message"]
        assert post(gw, "/v1/chat/completions", {"model": "raising", "max_tokens": 2, "messages": [
            {"role": "user", "content": "y"}]}).status_code == 200
    finally:
        gw.client.terminate_model("raising")


def test_the_cli_shows_reasoning_apart_and_tool_calls_as_json(gw, tmp_path):
    from tests.test_dropin import cli

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(tt.TOOLS))
    for stream in ("--stream", "--no-stream"):
        out = cli(gw, "chat", "-u", "tg", tt.WEATHER_Q, "--tools", str(tools), "--temperature", "0", stream)
        assert out.returncode == 0, out.stderr
        assert "<tool_call>" not in out.stdout
        call = json.loads(out.stdout[out.stdout.index("Tool call: ") + len("Tool call: "):])
        assert call["name"] == "get_weather" and call["arguments"] == {"city": "Paris"}
        out = cli(gw, "chat", "-u", "tt", tt.THINK_Q, "--temperature", "0", stream)
        assert out.stdout.startswith(f"Thinking: {tt.THINK_R}") and out.stdout.rstrip().endswith(tt.THINK_A)
        assert "<think>" not in out.stdout
    out = cli(gw, "chat", "-u", "tt", tt.THINK_Q, "--no-think", "--render")
    rendered = json.loads(out.stdout)
    assert rendered["prompt"].endswith("<think>\n\n</think>\n\n") and len(rendered["token_ids"]) == prompt_tokens(
        gw, [{"role": "user", "content": tt.THINK_Q}], enable_thinking=False)
    bad = cli(gw, "chat", "-u", "tt", "hi", "--tools", str(tmp_path / "missing.json"))
    assert bad.returncode != 0 and "tools" in bad.stderr

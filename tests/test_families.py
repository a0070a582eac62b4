"""Today's built-in families (Qwen 2.5 and 3, Llama 3.1-3.3, Mistral, Gemma 3, the DeepSeek-R1 distills, Phi-4):
each one's chat template renders as transformers' apply_chat_template renders it; a tool call an assistant turn of
the template writes is read back by the family's tool parser; and a registration that names the family (and leaves
them out) inherits its template, stops, tool parser and reasoning tags."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoTokenizer

from tests.test_templates import TALK, THINKING, TOOL_TURNS, Backend, plain
from zinfer.services.registry import catalog
from zinfer.services.worker.instance.llm_batcher import LLMBatcher
from zinfer.shared import compat, toolcalls
from zinfer.shared import tinytools as tt
from zinfer.shared.models import parse_llm

TODAY = ["qwen2.5-instruct", "qwen3", "llama-3.1-instruct", "llama-3.2-instruct", "llama-3.3-instruct",
         "mistral-instruct-v0.3", "gemma-3-it", "deepseek-r1-distill-qwen", "deepseek-r1-distill-llama", "phi-4"]
SYSTEM_TALK = [{"role": "system", "content": "Be kind."}, *TALK]


@pytest.fixture(scope="module")
def tok(tiny_models):
    return AutoTokenizer.from_pretrained(str(tiny_models["tools_pytorch"]))


def child(family: str, **extra) -> dict:
    """A custom registration that names the built-in family and gives none of what it inherits."""
    return {"version": 2, "model_name": f"my-{family}", "model_family": family, "model_lang": ["en"],
            "model_ability": ["chat", "tools"], "context_length": 2048,
            "model_specs": [{"model_format": "pytorch", "model_size_in_billions": 1, "quantization": "none",
                             "model_uri": "file:///nowhere"}], **extra}


def engine(family: str, tok) -> LLMBatcher:
    resolved = catalog.resolved(parse_llm(child(family)))
    return LLMBatcher("t", resolved, Backend(None, tok), lambda: None, 8)


def cases():
    for family in TODAY:
        parent = catalog.builtin_llms()[family]
        yield family, SYSTEM_TALK if family != "mistral-instruct-v0.3" else TALK, None, {}
        if "tools" in parent.model_ability:
            yield family, TOOL_TURNS, tt.TOOLS, {}
        if "reasoning" in parent.model_ability:
            yield family, THINKING, None, {}
    yield "qwen3", THINKING, None, {"enable_thinking": False}


@pytest.mark.parametrize("family,messages,tools,kwargs", list(cases()),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_each_family_renders_as_apply_chat_template(tok, family, messages, tools, kwargs):
    eng = engine(family, tok)
    plan = eng.plan(compat.chat_messages(messages), compat.chat_options({"tools": tools,
                                                                         "chat_template_kwargs": kwargs}))
    want = tok.apply_chat_template(plain(messages), tools=tools, add_generation_prompt=True, tokenize=False,
                                   chat_template=catalog.builtin_llms()[family].chat_template, **kwargs)
    assert plan.prompt == want and plan.source == "registration"
    if family == "qwen3" and kwargs:
        assert plan.prompt.endswith("<think>\n\n</think>\n\n")
    if family.startswith("deepseek-r1"):
        assert plan.opened  # the answer starts inside its reasoning: everything before </think> is reasoning


@pytest.mark.parametrize("family", [f for f in TODAY if "tools" in catalog.builtin_llms()[f].model_ability])
def test_a_call_the_template_writes_is_read_back_by_the_familys_parser(tok, family):
    template = catalog.builtin_llms()[family].chat_template
    asked = [{"role": "user", "content": tt.WEATHER_Q}]
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    before = tok.apply_chat_template(asked, tools=tt.TOOLS, add_generation_prompt=True, tokenize=False,
                                     chat_template=template)
    after = tok.apply_chat_template([*asked, call], tools=tt.TOOLS, tokenize=False, chat_template=template)
    at = len(os.path.commonprefix([before, after]))  # the model writes what follows the generation prompt
    header, turn = before[at:], after[at:]
    assert turn.startswith(header), (header, turn)
    turn = turn[len(header):]
    family_def = catalog.builtin_llms()[family]
    for stop in [*(family_def.stop or ()), tok.eos_token]:
        turn = turn.split(stop)[0]
    parser = toolcalls.lookup(family_def.v2_extras["tool_parser"])
    content, calls = parser.parse(turn.strip())
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})], turn
    assert not content.strip()


@pytest.mark.parametrize("family", TODAY)
def test_a_registration_naming_the_family_inherits_what_it_leaves_out(tok, family):
    parent = catalog.builtin_llms()[family]
    got = catalog.resolved(parse_llm(child(family)))
    assert got.chat_template == parent.chat_template
    assert (got.stop, got.stop_token_ids) == (parent.stop, parent.stop_token_ids)
    for key in catalog.INHERITED:
        assert got.v2_extras.get(key) == parent.v2_extras.get(key)
    eng = LLMBatcher("t", got, Backend(None, tok), lambda: None, 8)
    assert (eng.tool_parser is not None) == ("tools" in parent.model_ability)
    assert (eng.reasoning_tags() is not None) == ("reasoning" in parent.model_ability)
    # what the registration gives itself wins
    own = catalog.resolved(parse_llm(child(family, chat_template="{{ messages[0].content }}", stop=["END"],
                                           tool_parser="pythonic")))
    assert own.chat_template == "{{ messages[0].content }}" and own.stop == ["END"]
    assert own.v2_extras["tool_parser"] == "pythonic"

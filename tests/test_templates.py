"""Chat templates rendered as transformers' apply_chat_template renders them, from each place a template comes from
(the registration's chat_template, the folder's chat_template.jinja, tokenizer_config.json, GGUF metadata), table
driven over templates in the layouts of today's families: ChatML, Llama 3.1 with tools (strftime_now, tojson with
indent), Mistral (raise_exception on roles that do not alternate), Qwen 3 (namespace, reversed loops, enable_thinking)
and Gemma (the model role, trim). The engine's own choice of template (LLMBatcher.plan) is what renders here, on a
stand-in backend that carries what a loaded model would: its template and special tokens."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from transformers import AutoTokenizer

from zinfer.services.worker.instance.llm_batcher import LLMBatcher
from zinfer.services.worker.instance.prompts import render_chat_template
from zinfer.shared import compat
from zinfer.shared import tinytools as tt
from zinfer.shared.errors import InvalidRequest
from zinfer.shared.models import parse_llm
from zinfer.shared.tinymodels import convert_to_gguf

CHATML = """{% for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA31 = """{{- bos_token }}
{%- set date_string = strftime_now("%d %b %Y") %}
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}{{- "<|eot_id|>" }}
{%- if tools is not none %}
    {%- set first_user_message = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, answer with a JSON call {\\"name\\": ..., \\"parameters\\": ...}.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls | length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", "parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {%- if builtin_tools is defined %}{{- "<|eom_id|>" }}{%- else %}{{- "<|eot_id|>" }}{%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable and message.content is not string %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

MISTRAL = """{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}\
{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}\
{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"""

QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- "# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}
                {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
                {{- '<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

GEMMA = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + \
'\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = "" %}{% set loop_messages = messages %}\
{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}{% endif %}\
{% if (message['role'] == 'assistant') %}{% set role = "model" %}{% else %}{% set role = message['role'] %}{% endif %}\
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}{{ message['content'] | trim }}\
{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"""

TOOL_TURNS = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": tt.WEATHER_Q},
              {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                  "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
              {"role": "tool", "tool_call_id": "c1", "content": tt.SUNNY}]
TALK = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "  Tell me about whales.  "}]
THINKING = [{"role": "user", "content": tt.THINK_Q},
            {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
            {"role": "user", "content": "And 3+3?"}]

# (name, template, messages, tools, chat_template_kwargs)
CASES = [
    ("chatml", CHATML, [{"role": "system", "content": "Be kind."}, *TALK], None, {}),
    ("llama3.1-tools", LLAMA31, TOOL_TURNS, tt.TOOLS, {}),
    ("llama3.1-plain", LLAMA31, TALK, None, {}),
    ("mistral", MISTRAL, TALK, None, {}),
    ("qwen3-tools", QWEN3, TOOL_TURNS, tt.TOOLS, {}),
    ("qwen3-no-thinking", QWEN3, THINKING, None, {"enable_thinking": False}),
    ("gemma", GEMMA, [{"role": "system", "content": "Be kind."}, *TALK], None, {}),
]
SOURCES = ["registration", "chat_template.jinja", "tokenizer_config.json", "gguf"]


def plain(messages):
    """The messages as transformers takes them: tool calls' arguments as objects, not JSON text."""
    return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(
        c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]


class Backend:
    """What LLMBatcher reads of a loaded model to render a chat: its own template and special tokens."""

    def __init__(self, chat_template, tok, gguf_meta: bool = False):
        self.chat_template = chat_template
        self.bos_token, self.eos_token = tok.bos_token or "", tok.eos_token or ""
        self.template_vars = {} if gguf_meta else dict(tok.special_tokens_map)
        self.grammars = None


def engine(backend, chat_template: str | None = None) -> LLMBatcher:
    definition = tt.registration("t", "/nowhere")
    if chat_template:
        definition["chat_template"] = chat_template
    return LLMBatcher("t", parse_llm(definition), backend, lambda: None, 8)


@pytest.fixture(scope="module")
def base(tiny_models, tmp_path_factory):
    return tiny_models["tools_pytorch"]


def with_template(base, folder, template: str, source: str):
    """A copy of the tiny tool model's tokenizer whose template comes from `source`."""
    shutil.copytree(base, folder)
    (folder / "chat_template.jinja").unlink()
    if source == "chat_template.jinja":
        (folder / "chat_template.jinja").write_text(template)
    elif source == "tokenizer_config.json":  # the older place, which transformers still reads
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name,template,messages,tools,kwargs", CASES, ids=[c[0] for c in CASES])
def test_templates_render_as_apply_chat_template(base, tmp_path, source, name, template, messages, tools, kwargs):
    folder = with_template(base, tmp_path / "tok", template, source if source != "gguf" else "chat_template.jinja")
    tok = AutoTokenizer.from_pretrained(str(folder))
    if source == "registration":
        eng = engine(Backend(None, tok), chat_template=template)
    elif source == "gguf":
        from llama_cpp import Llama

        gguf = convert_to_gguf(folder, tmp_path / "t.gguf", "F32") if (folder / "model.safetensors").exists() \
            else None
        meta = Llama(str(gguf), vocab_only=True, verbose=False).metadata
        eng = engine(Backend(meta["tokenizer.chat_template"], tok, gguf_meta=True))
    else:
        assert tok.chat_template == template
        eng = engine(Backend(tok.chat_template, tok))
    options = compat.chat_options({"tools": tools, "chat_template_kwargs": kwargs})
    plan = eng.plan(compat.chat_messages(messages), options)
    want = tok.apply_chat_template(plain(messages), tools=tools, add_generation_prompt=True, tokenize=False,
                                   chat_template=template, **kwargs)
    assert plan.prompt == want
    assert plan.source == ("registration" if source == "registration" else "model")


def test_a_named_tool_use_template_is_taken_when_tools_are_passed(base, tmp_path):
    folder = with_template(base, tmp_path / "tok", CHATML, "chat_template.jinja")
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = {"default": CHATML, "tool_use": QWEN3}
    tok.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert isinstance(tok.chat_template, dict) and set(tok.chat_template) == {"default", "tool_use"}
    eng = engine(Backend(tok.chat_template, tok))
    for tools in (None, tt.TOOLS):
        plan = eng.plan(compat.chat_messages(TALK), compat.chat_options({"tools": tools}))
        assert plan.prompt == tok.apply_chat_template(TALK, tools=tools, add_generation_prompt=True, tokenize=False)
    assert "<tools>" in plan.prompt


def test_mistral_roles_that_do_not_alternate_are_a_400_naming_messages(base):
    tok = AutoTokenizer.from_pretrained(str(base))
    eng = engine(Backend(None, tok), chat_template=MISTRAL)
    with pytest.raises(InvalidRequest, match="Conversation roles must alternate") as err:
        eng.plan(compat.chat_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
                 compat.chat_options({}))
    assert err.value.field == "messages"


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",  # grows
    "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = j * i %}{% endfor %}{% endfor %}",  # loops
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",  # recurses
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # reaches for Python's internals
    "{% set ns = namespace(_x=1) %}{{ ns }}",
])
def test_the_sandbox_stops_templates_that_run_away_or_reach_out(template):
    start = time.monotonic()
    with pytest.raises(InvalidRequest) as err:
        render_chat_template(template, [{"role": "user", "content": "x"}], timeout_s=1.0)
    assert err.value.field == "messages"
    assert time.monotonic() - start < 30  # stopped, not run to the end (generous: a busy machine)


def test_no_template_anywhere_is_refused_at_launch_naming_chat_template(base):
    tok = AutoTokenizer.from_pretrained(str(base))
    with pytest.raises(InvalidRequest) as err:
        engine(Backend(None, tok))
    assert err.value.field == "chat_template"


def test_generation_stops_at_every_end_the_files_name(base):
    """generation_config.json's eos_token_id list and the tokenizer's EOS all end a sequence (transformers)."""
    from zinfer.services.worker.instance.backends.transformers_backend import TransformersBackend

    tok = AutoTokenizer.from_pretrained(str(base))
    backend = TransformersBackend(str(base), "cpu", "none", 2048)
    ends = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    assert set(backend.eos_ids) == ends and tok.eos_token_id in backend.eos_ids

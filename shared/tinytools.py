"""A tiny chat model built as real tool-calling chat models are, for tests of tools and reasoning: a small
Llama whose tokenizer has a ChatML template with a tools section (saved as chat_template.jinja) and `<tool_call>`,
`</tool_call>`, `<think>`, `</think>` as added text tokens (not special), trained on the CPU until greedy decoding
answers a weather question with a Hermes tool call, "think: ..." with a `<think>` block, and anything else it
was taught in text; and the same weights as GGUF (those tokens USER_DEFINED, so llama.cpp tokenizes and prints
them as transformers does).

Training is seeded and stops as soon as every taught prompt decodes to its answer (about 20 s on 2 cores);
`build_tool_llama` raises if it never does, so a test never runs on a model that has not learnt.
"""

from __future__ import annotations

import json
from pathlib import Path

TAGS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A ChatML template with a tools section, in the layout Qwen 2.5 / Qwen 3 use (written for this model).
TEMPLATE = """{%- if tools %}
<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call functions. Their signatures are within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

Call one by writing a JSON object with its name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}
<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}
<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}
{% if not loop.first or message.content %}

{% endif %}
{% set args = call.function.arguments %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ args if args is string else args | tojson }}}
</tool_call>
{%- endfor %}
<|im_end|>
{% elif message.role == 'tool' %}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role != 'system' or not loop.first %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}
<think>

</think>

{% endif %}
{%- endif %}
"""

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"]}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]

WEATHER_Q = "What is the weather in Paris?"
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HELLO = "Hello there"
HELLO_A = "Hello! How can I help you today?"
THINK_Q = "think: what is 2+2?"
THINK_R = "Two plus two makes four."
THINK_A = "The answer is 4."
SUNNY = '{"city": "Paris", "sky": "sunny", "celsius": 22}'
SUNNY_A = "It is sunny and 22 C in Paris."


def _weather_turns() -> list[dict]:
    return [{"role": "user", "content": WEATHER_Q},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": SUNNY}]


# (messages, tools, chat_template_kwargs, the answer greedy decoding must give)
LESSONS = [
    ([{"role": "user", "content": WEATHER_Q}], TOOLS, {}, WEATHER_CALL),
    ([{"role": "user", "content": HELLO}], TOOLS, {}, HELLO_A),
    (_weather_turns(), TOOLS, {}, SUNNY_A),
    ([{"role": "user", "content": THINK_Q}], None, {}, f"<think>\n{THINK_R}\n</think>\n\n{THINK_A}"),
    ([{"role": "user", "content": THINK_Q}], None, {"enable_thinking": False}, THINK_A),
    ([{"role": "user", "content": HELLO}], None, {}, HELLO_A),
]

_CORPUS = """<|im_start|>system <|im_end|> You may call functions. Their signatures are within tools:
{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
"parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]}}}
{"name": "get_time", "arguments": {"city": "Tokyo"}} What is the weather in Paris? Hello! How can I help you today?
think: what is 2+2? Two plus two makes four. The answer is 4. It is sunny and 22 C in Paris. The sky is cloudy.
"""


def _tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAGS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = TEMPLATE
    return fast


def _examples(tok) -> list[tuple[list[int], int]]:
    """(token ids of prompt + answer + <|im_end|>, where the answer starts) for each lesson."""
    out = []
    for messages, tools, kwargs, answer in LESSONS:
        prompt = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs)
        ids = tok(prompt, add_special_tokens=False).input_ids
        out.append((ids + tok(answer + "<|im_end|>", add_special_tokens=False).input_ids, len(ids)))
    return out


def _learnt(model, tok, examples) -> bool:
    import torch

    with torch.no_grad():
        for ids, start in examples:
            want = ids[start:]
            got = model.generate(torch.tensor([ids[:start]]), max_new_tokens=len(want), do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, start:].tolist()
            if got != want:
                return False
    return True


def build_tool_llama(out_dir: Path, seed: int = 0, max_steps: int = 3000) -> Path:
    """Train the tiny tool-calling model (about 20 s) and save it with save_pretrained into out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=None, eos_token_id=end, pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    examples = _examples(tok)
    width = max(len(ids) for ids, _ in examples)
    inputs = torch.full((len(examples), width), tok.pad_token_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, start) in enumerate(examples):
        inputs[i, :len(ids)] = torch.tensor(ids)
        labels[i, start:len(ids)] = torch.tensor(ids[start:])
        mask[i, :len(ids)] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(1, max_steps + 1):
        loss = model(input_ids=inputs, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 and loss.item() < 0.05:
            model.eval()
            if _learnt(model, tok, examples):
                break
            model.train()
    else:
        raise RuntimeError(f"the tiny tool model did not learn its lessons in {max_steps} steps")
    model.eval()
    model.generation_config.eos_token_id = [end, tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "lessons.json").write_text(json.dumps({"steps": step, "loss": loss.item()}))
    return out_dir


def registration(name: str, folder: Path) -> dict:
    """Its Xinference v2 JSON: abilities chat, tools, reasoning and the reasoning tags; no tool_parser and no
    chat_template (both come from the folder)."""
    return {"version": 2, "model_name": name, "model_lang": ["en"], "model_ability": ["chat", "tools", "reasoning"],
            "model_family": "other", "context_length": 2048, "reasoning_start_tag": "<think>",
            "reasoning_end_tag": "</think>",
            "model_specs": [{"model_format": "pytorch", "model_size_in_billions": "0_01", "quantization": "none",
                             "model_uri": str(folder)}]}


def gguf_registration(name: str, gguf_file: Path) -> dict:
    out = registration(name, gguf_file)
    out["model_specs"] = [{"model_format": "ggufv2", "model_size_in_billions": "0_01", "quantization": "F32",
                           "model_uri": str(gguf_file.parent),
                           "model_file_name_template": "tool-llama.{quantization}.gguf"}]
    return out

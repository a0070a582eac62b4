"""Unit tests of the tool-call parsers and of the answer splitter (reasoning, content, calls) on model outputs in
each format: whole answers, and the same answers streamed in pieces of every size (tags and calls split across
pieces), which must give the same reasoning, content and calls."""

from __future__ import annotations

import json

import pytest

from zinfer.services.worker.instance.answer import AnswerSplitter
from zinfer.shared import toolcalls

HERMES, LLAMA, MISTRAL, PYTHONIC = (toolcalls.lookup(n) for n in ("hermes", "llama3_json", "mistral", "pythonic"))
W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
T = '{"name": "get_time", "arguments": {"city": "Tokyo"}}'
THINK = ("<think>", "</think>")

# (parser, tags, opened, text, reasoning, content, [(name, arguments)])
CASES = [
    (HERMES, None, False, f"<tool_call>\n{W}\n</tool_call>", "", "", [("get_weather", {"city": "Paris"})]),
    (HERMES, None, False, f"Let me look.\n<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{T}\n</tool_call>", "",
     "Let me look.\n", [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Tokyo"})]),
    (HERMES, None, False, "<tool_call>\n{not json}\n</tool_call>", "", "<tool_call>\n{not json}\n</tool_call>", []),
    (HERMES, None, False, "<tool_call>\n{\"name\": \"f\"", "", "<tool_call>\n{\"name\": \"f\"", []),  # cut off
    (HERMES, None, False, "Plain text, no calls: a < b.", "", "Plain text, no calls: a < b.", []),
    (HERMES, THINK, False, f"<think>\nWeather wanted.\n</think>\n\n<tool_call>\n{W}\n</tool_call>",
     "Weather wanted.", "", [("get_weather", {"city": "Paris"})]),
    (None, THINK, False, "<think>\nTwo and two.\n</think>\n\nFour.", "Two and two.", "Four.", []),
    (None, THINK, True, "Two and two.\n</think>\n\nFour.", "Two and two.", "Four.", []),  # the prompt opened it
    (None, THINK, False, "No thinking here <think> at all.", "", "No thinking here <think> at all.", []),
    (None, THINK, False, "<think>\nnever closed", "never closed", "", []),
    (LLAMA, None, False, '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", "",
     [("get_weather", {"city": "Paris"})]),
    (LLAMA, None, False, '<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"x": 1}}',
     "", "", [("f", {}), ("g", {"x": 1})]),
    (LLAMA, None, False, "{ this is a brace, not a call", "", "{ this is a brace, not a call", []),
    (MISTRAL, None, False, f'[TOOL_CALLS][{W}, {T}]', "", "",
     [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Tokyo"})]),
    (MISTRAL, None, False, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", "",
     [("get_weather", {"city": "Paris"})]),
    (PYTHONIC, None, False, '[get_weather(city="Paris"), get_time(city="Tokyo", utc=True)]', "", "",
     [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Tokyo", "utc": True})]),
    (PYTHONIC, None, False, "[__import__('os').system('x')]", "", "[__import__('os').system('x')]", []),
    (PYTHONIC, None, False, "[1, 2, 3]", "", "[1, 2, 3]", []),
]


def run(parser, tags, opened, pieces):
    splitter = AnswerSplitter(tags, parser, opened)
    reasoning, content, calls = "", "", []
    for i, piece in enumerate(pieces):
        out = splitter.push(piece, i == len(pieces) - 1)
        reasoning, content, calls = reasoning + out.reasoning, content + out.content, calls + out.calls
    return reasoning, content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0].name if c[0] else 'none'}-{i}" for i, c in enumerate(CASES)])
def test_answers_split_the_same_whole_and_streamed(case):
    parser, tags, opened, text, reasoning, content, calls = case
    assert run(parser, tags, opened, [text]) == (reasoning, content, calls)
    for size in (1, 2, 3, 5, 8):
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        assert run(parser, tags, opened, pieces) == (reasoning, content, calls), size


def test_parsers_are_found_by_name_alias_and_template():
    assert toolcalls.lookup("qwen") is HERMES and toolcalls.lookup("llama3") is LLAMA
    assert toolcalls.lookup("nope") is None
    assert toolcalls.detect("{% if tools %}<tool_call>{% endif %}") is HERMES
    assert toolcalls.detect("[TOOL_CALLS]") is MISTRAL
    assert toolcalls.detect("{{ '<|python_tag|>' }}") is LLAMA
    assert toolcalls.detect("{{ messages }}") is None and toolcalls.detect(None) is None
    assert set(toolcalls.NAMES) == {"hermes", "llama3_json", "mistral", "pythonic"}


def test_a_call_id_is_unique():
    ids = {c.id for c in HERMES.parse("\n".join(f"<tool_call>\n{W}\n</tool_call>" for _ in range(20)))[1]}
    assert len(ids) == 20

"""Structured output and tools: what constrained decoding, tool-call parsing and template rendering cost.

1. json_schema decoding against free decoding, tokens/s, at 1 and 16 streams, on each engine (the small random
   Llama of make_small_llama: transformers and llama.cpp), measured in the same run, rounds interleaved. Free
   decoding ignores end tokens so that both run to max_tokens (or the grammar's end).
2. A second request with the same schema compiles nothing (the instance's grammars_compiled counter).
3. Tool-call parsing in a stream: the answer splitter's cost per token (in-process) against the served time per
   token of a one-stream chat on llama.cpp, measured in the same run.
4. Rendering 20 tools and 50 messages through the chat template (in-process, median).

    .venv/bin/python bench/structured.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import concurrently, record, start_mesh, tiny_models

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "notes": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 30, "maxItems": 40},
    "score": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["title", "notes", "score"]}
PROMPT = "Write down some notes about whales and octopuses."
MAX_TOKENS = 128


def tokens_per_s(handles, n: int, constrained: bool) -> float:
    cfg = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    if constrained:
        cfg["response_format"] = {"type": "json_schema", "json_schema": {"name": "notes", "schema": SCHEMA}}
    start = time.perf_counter()
    outs = concurrently(n, lambda i: handles[i].generate(PROMPT, cfg))
    elapsed = time.perf_counter() - start
    return sum(o["usage"]["completion_tokens"] for o in outs) / elapsed


def splitter_us_per_token(tokens: list[str]) -> tuple[float, float]:
    """(µs per token through the answer splitter with a Hermes parser and reasoning tags, µs without)."""
    from zinfer.services.worker.instance.answer import AnswerSplitter
    from zinfer.shared.toolcalls import lookup

    def run(split: bool) -> float:
        best = float("inf")
        for _ in range(5):
            splitter = AnswerSplitter(("<think>", "</think>"), lookup("hermes")) if split else None
            start = time.perf_counter()
            for i, t in enumerate(tokens):
                if splitter is not None:
                    splitter.push(t, i == len(tokens) - 1)
            best = min(best, time.perf_counter() - start)
        return best / len(tokens) * 1e6

    return run(True), run(False)


def render_ms() -> float:
    from zinfer.services.worker.instance.prompts import render_chat_template
    from zinfer.shared import tinytools

    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": f"Tool number {i}.",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}, "days": {"type": "integer"}},
                                                   "required": ["city"]}}} for i in range(20)]
    messages = [{"role": "system", "content": "You are helpful."}]
    for i in range(49):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"Message {i} " * 8})
    render_chat_template(tinytools.TEMPLATE, messages, tools=tools)  # compiled once, as an instance does
    times = []
    for _ in range(50):
        start = time.perf_counter()
        render_chat_template(tinytools.TEMPLATE, messages, tools=tools)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from zinfer.shared.tinymodels import make_small_llama

    models = tiny_models()
    small = make_small_llama(models["pytorch"].parent)
    mesh = start_mesh()
    results: dict = {}
    try:
        c = mesh.client
        c.register_model("LLM", {
            "version": 1, "model_name": "small", "model_lang": ["en"], "model_ability": ["generate", "chat"],
            "context_length": 2048, "model_specs": [
                {"model_format": "pytorch", "model_size_in_billions": 1, "quantizations": ["none"],
                 "model_uri": str(small["small_pytorch"])},
                {"model_format": "ggufv2", "model_size_in_billions": 1, "quantizations": ["F32"],
                 "model_uri": str(small["small_gguf_dir"]),
                 "model_file_name_template": "small-llama.{quantization}.gguf"}]})
        c.launch_model(model_name="small", model_uid="hf", model_format="pytorch")
        c.launch_model(model_name="small", model_uid="gg", model_format="ggufv2", quantization="F32")
        for uid in ("hf", "gg"):
            handles = [mesh.new_client().get_model(uid) for _ in range(16)]
            tokens_per_s(handles, 1, True)  # warm: the vocabulary for the grammar library, the schema compiled
            for n in (1, 16):
                free, fixed = [], []
                for _ in range(args.rounds):
                    free.append(tokens_per_s(handles, n, False))
                    fixed.append(tokens_per_s(handles, n, True))
                f, s = statistics.median(free), statistics.median(fixed)
                results[f"{uid}_{n}"] = {"free_tok_s": round(f, 1), "json_schema_tok_s": round(s, 1),
                                         "ratio": round(s / f, 3)}
                print(f"{'transformers' if uid == 'hf' else 'llama.cpp'} x{n}: free {f:.1f} tok/s, json_schema "
                      f"{s:.1f} tok/s -> {s / f:.3f}x (target >= 0.85x)")
            before = c.describe_model(uid)["stats"]["grammars_compiled"]
            tokens_per_s(handles, 1, True)
            after = c.describe_model(uid)["stats"]["grammars_compiled"]
            results[f"{uid}_recompiled"] = after - before
            print(f"  the same schema again: {after - before} grammars compiled (target 0)")
        gg = c.get_model("gg")
        chunks = list(gg.chat([{"role": "user", "content": PROMPT}], generate_config={
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True, "stream_interval_ms": 0}))
        start = time.perf_counter()
        list(gg.chat([{"role": "user", "content": PROMPT}], generate_config={
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True, "stream_interval_ms": 0}))
        served_us = (time.perf_counter() - start) / MAX_TOKENS * 1e6
        pieces = [ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"]]
    finally:
        mesh.stop()
    split_us, bare_us = splitter_us_per_token(pieces)
    share = (split_us - bare_us) / served_us
    print(f"tool-call parsing in a stream: {split_us - bare_us:.2f} us per token against {served_us:.0f} us per "
          f"served token (llama.cpp, one stream) -> {share * 100:.2f}% (target <= 3%)")
    ms = render_ms()
    print(f"rendering 20 tools and 50 messages: {ms:.2f} ms (target <= 5 ms)")
    results.update(parse_us_per_token=round(split_us - bare_us, 3), served_us_per_token=round(served_us, 1),
                   parse_share=round(share, 4), render_ms=round(ms, 3))
    record("structured", results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

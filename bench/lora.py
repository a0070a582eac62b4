"""LoRA adapters: 16 streams spread over the base model and two adapters (base, A, B, base, A, B, ...) against 16
streams on the base model alone, same run, same small model (a random Llama of hidden 512, 8 layers), on both
engines; and what naming an adapter adds before a stream's first token.

Each engine runs two instances of the small model: `plain` (no adapters: the engine's own fast path) and `lora`
(adapters A and B loaded, rank 16 on every projection). Rows: 16 base streams on plain and on lora, 16 mixed
streams on lora; the ratio the issue asks for is mixed over base-alone on the plain instance. Time to first
token: one stream, alternately naming A and nothing, on the lora instance, the median of each; and the raw
engine's own first token with A and without (the adapter's arithmetic), so that what serving adds beyond the
adapter's own cost shows.

    .venv/bin/python bench/lora.py [--tokens 64] [--rounds 3] [--engine transformers|llama.cpp|both]
"""

from __future__ import annotations

import statistics
import time

from common import StreamCrowd, arguments, record, start_mesh, tiny_models

from zinfer.shared.tinymodels import build_lora_adapter, convert_lora_to_gguf, make_small_llama

PROMPTS = [f"Stream number {i} tells the story of" for i in range(16)]
MIXED = [(None, "A", "B")[i % 3] for i in range(16)]


def adapters(small: dict) -> dict:
    out = {}
    for name, seed in (("A", 11), ("B", 12)):
        folder = small["small_pytorch"].parent / f"small-lora-{name}"
        if not (folder / "adapter_model.safetensors").exists():
            build_lora_adapter(small["small_pytorch"], folder, seed, rank=16)
        gguf_file = folder.with_suffix(".gguf")
        if not gguf_file.exists():
            convert_lora_to_gguf(folder, small["small_pytorch"], gguf_file)
        out[name], out[f"{name}_gguf"] = folder, gguf_file
    return out


def tok_s(mesh, uid, loras, tokens, rounds) -> float:
    crowd = StreamCrowd(mesh, uid, PROMPTS, tokens, ignore_eos=True, loras=loras)
    crowd.run()
    return max(n / el for el, n, _ in (crowd.run() for _ in range(rounds)))


def first_token_ms(mesh, uid, tokens, rounds) -> dict:
    crowds = {lora: StreamCrowd(mesh, uid, PROMPTS[:1], 2, loras=[lora]) for lora in (None, "A")}
    times: dict = {None: [], "A": []}
    for crowd in crowds.values():
        crowd.run()
    for _ in range(20 * rounds):
        for lora, crowd in crowds.items():
            times[lora].append(crowd.run()[2][0] * 1000)
    base, named = statistics.median(times[None]), statistics.median(times["A"])
    return {"ttft_base_ms": round(base, 2), "ttft_adapter_ms": round(named, 2),
            "adapter_adds_ms": round(named - base, 2)}


def raw_first_token_ms(engine: str, small: dict, found: dict, rounds: int) -> dict:
    """The raw engine's own time to the first token of one stream, with adapter A and without, in this process:
    PEFT's forward over the prompt (A active) against the plain model's, and llama-cpp-python's
    create_completion(max_tokens=1) with lora_path against without. The adapter's own arithmetic; what serving
    adds beyond it is the served difference less this one."""
    prompt = PROMPTS[0]
    times: dict = {}
    if engine == "transformers":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(small["small_pytorch"])
        ids = tok(prompt, return_tensors="pt").input_ids
        plain = AutoModelForCausalLM.from_pretrained(small["small_pytorch"]).eval()
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small["small_pytorch"]),
                                            found["A"]).eval()
        for name, model in (("base", plain), ("A", adapted)):
            runs = []
            for _ in range(20 * rounds):
                start = time.perf_counter()
                with torch.inference_mode():
                    model(input_ids=ids, logits_to_keep=1).logits.argmax()
                runs.append((time.perf_counter() - start) * 1000)
            times[name] = statistics.median(runs)
    else:
        from llama_cpp import Llama

        for name, lora in (("base", None), ("A", str(found["A_gguf"]))):
            llm = Llama(str(small["small_gguf"]), n_ctx=512, lora_path=lora, verbose=False)
            runs = []
            for _ in range(20 * rounds):
                start = time.perf_counter()
                llm.create_completion(prompt, max_tokens=1, temperature=0)
                runs.append((time.perf_counter() - start) * 1000)
                llm.reset()
            llm.close()
            times[name] = statistics.median(runs)
    return {"raw_ttft_base_ms": round(times["base"], 2), "raw_ttft_adapter_ms": round(times["A"], 2),
            "raw_adapter_adds_ms": round(times["A"] - times["base"], 2)}


def main() -> None:
    args = arguments(3, ("--tokens", {"type": int, "default": 64}),
                     ("--engine", {"default": "both", "choices": ["transformers", "llama.cpp", "both"]}))
    small = make_small_llama(tiny_models()["pytorch"].parent)
    found = adapters(small)
    report: dict = {"tokens": args.tokens, "streams": len(PROMPTS), "model": "small-llama (hidden 512, 8 layers)"}
    mesh = start_mesh()
    try:
        c = mesh.client
        c.register_model("LLM", {"model_name": "bench-small", "model_lang": ["en"], "model_ability": ["generate"],
                                 "context_length": 2048, "model_specs": [
                                     {"model_format": "pytorch", "model_size_in_billions": 1,
                                      "quantizations": ["none"], "model_uri": str(small["small_pytorch"])},
                                     {"model_format": "ggufv2", "model_size_in_billions": 1, "quantizations": ["F32"],
                                      "model_file_name_template": "small-llama.{quantization}.gguf",
                                      "model_uri": str(small["small_gguf_dir"])}]})
        for engine, fmt, suffix in (("transformers", "pytorch", ""), ("llama.cpp", "ggufv2", "_gguf")):
            if args.engine not in ("both", engine):
                continue
            loras = {"lora_list": [{"lora_name": n, "local_path": str(found[n + suffix])} for n in ("A", "B")]}
            c.launch_model(model_name="bench-small", model_format=fmt, model_uid="plain")
            c.launch_model(model_name="bench-small", model_format=fmt, model_uid="lora", peft_model_config=loras)
            row = {"base_plain": tok_s(mesh, "plain", None, args.tokens, args.rounds),
                   "base_lora": tok_s(mesh, "lora", None, args.tokens, args.rounds),
                   "mixed_lora": tok_s(mesh, "lora", MIXED, args.tokens, args.rounds)}
            row["ratio_mixed_vs_base_plain"] = round(row["mixed_lora"] / row["base_plain"], 3)
            row["ratio_mixed_vs_base_lora"] = round(row["mixed_lora"] / row["base_lora"], 3)
            row.update(first_token_ms(mesh, "lora", args.tokens, args.rounds))
            row.update(raw_first_token_ms(engine, small, found, args.rounds))
            row["served_adds_beyond_raw_ms"] = round(row["adapter_adds_ms"] - row["raw_adapter_adds_ms"], 2)
            report[engine] = row
            print(engine, row, flush=True)
            c.terminate_model("plain")
            c.terminate_model("lora")
    finally:
        mesh.stop()
    record("lora", report)


if __name__ == "__main__":
    main()

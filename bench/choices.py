"""Several choices of one request (`n`): served `n=4` against the raw engine's own way to 4 choices, same model, same
prompt, same run. On llama.cpp (the default) that is llama-cpp-python's create_completion run 4 times (it takes no
`n`), with the same seeds; with `--engine transformers`, one `generate(num_return_sequences=4)` (sampled; its
random numbers are drawn otherwise, so only the time is compared). The model is the small random
Llama of bench/generate.py (hidden 512, 8 layers, F32 GGUF); the prompt 1,150 tokens, 16 new tokens a choice
(EOS held off on both sides: min_tokens served, a logit bias raw), temperature 0.8. The served choices prefill the
prompt once (the others copy its cache); the raw calls start from an empty cache, and the second to fourth reuse
the first one's prompt.

    .venv/bin/python bench/choices.py [--rounds 3] [--engine llama|transformers]
"""

from __future__ import annotations

import statistics
import time

from common import arguments, record, start_mesh, tiny_models

from zinfer.shared.tinymodels import make_small_llama

N, NEW, SEED = 4, 16, 7


def raw_llama(path, prompt: str):
    import llama_cpp

    model = llama_cpp.Llama(str(path), n_ctx=2048, verbose=False)
    never = {t: float("-inf") for t in range(model.n_vocab()) if llama_cpp.llama_vocab_is_eog(model._model.vocab, t)}

    def raw() -> list[str]:
        # From an empty cache, as the served request starts: the first call prefills the prompt, the next three
        # reuse it (create_completion keeps the prefix it shares with the last call's tokens).
        model.reset()
        return [model.create_completion(prompt, max_tokens=NEW, temperature=0.8, seed=SEED + i,
                                        logit_bias=never)["choices"][0]["text"] for i in range(N)]

    return raw, model.close


def raw_transformers(folder, prompt: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt")

    def raw() -> list[str]:
        torch.manual_seed(SEED)
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=True, temperature=0.8, num_return_sequences=N, max_new_tokens=NEW,
                                 min_new_tokens=NEW, pad_token_id=tok.eos_token_id)
        return tok.batch_decode(out[:, ids.input_ids.shape[1]:], skip_special_tokens=True)

    return raw, lambda: None


def main() -> None:
    args = arguments(3, ("--engine", {"choices": ["llama", "transformers"], "default": "llama"}))
    small = make_small_llama(tiny_models()["pytorch"].parent)
    prompt = "Once upon a time there was a village by the sea where the fishermen sang at night. " * 50
    if args.engine == "llama":
        raw, close = raw_llama(small["small_gguf"], prompt)
        spec = {"model_format": "ggufv2", "model_size_in_billions": 1, "quantizations": ["F32"],
                "model_uri": str(small["small_gguf"]), "model_file_name_template": "small-llama.{quantization}.gguf"}
    else:
        raw, close = raw_transformers(small["small_pytorch"], prompt)
        spec = {"model_format": "pytorch", "model_size_in_billions": 1, "quantizations": ["none"],
                "model_uri": str(small["small_pytorch"])}

    mesh = start_mesh()
    try:
        c = mesh.client
        c.register_model("LLM", {"model_name": "bench-small", "model_lang": ["en"], "model_ability": ["generate"],
                                 "context_length": 2048, "model_specs": [spec]})
        c.launch_model(model_name="bench-small", model_format=spec["model_format"], model_uid="small")
        handle = c.get_model("small")

        def served() -> list[str]:
            out = handle.generate(prompt, {"max_tokens": NEW, "temperature": 0.8, "seed": SEED, "n": N,
                                           "min_tokens": NEW})
            return [choice["text"] for choice in out["choices"]]

        prompt_tokens = handle.generate(prompt, {"max_tokens": 1})["usage"]["prompt_tokens"]
        got, want = served(), raw()
        assert len(got) == len(want) == N and len(set(got)) > 1
        if args.engine == "llama":  # create_completion goes past max_tokens while a UTF-8 character is open
            assert all(g and w.startswith(g) for g, w in zip(got, want, strict=True)), \
                "the served choices differ from create_completion's with the same seeds"
        times: dict[str, list[float]] = {"raw": [], "served": []}
        for _ in range(args.rounds):  # interleaved, so that a busy moment hits both sides alike
            for name, fn in (("raw", raw), ("served", served)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        mesh.stop()
        close()
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["raw"] / median["served"]
    against = f"create_completion x{N}" if args.engine == "llama" else f"generate(num_return_sequences={N})"
    print(f"{args.engine}: n={N} choices of a {prompt_tokens}-token prompt, {NEW} new tokens each: raw {against} "
          f"{median['raw'] * 1000:.0f} ms, served n={N} {median['served'] * 1000:.0f} ms -> {ratio:.2f}x raw")
    record("choices", {"model": "random Llama 512x8 (F32)", "engine": args.engine, "against": against,
                       "prompt_tokens": prompt_tokens, "n": N, "new_tokens": NEW,
                       "raw_ms": round(median["raw"] * 1000, 1), "served_ms": round(median["served"] * 1000, 1),
                       "ratio": round(ratio, 2)})


if __name__ == "__main__":
    main()

"""Several choices of one request (`n`) on llama.cpp: served `n=4` against llama-cpp-python's create_completion run
4 times (the raw engine takes no `n`), same model, same prompt, same seeds, same run. The model is the small random
Llama of bench/generate.py (hidden 512, 8 layers, F32 GGUF); the prompt 1,150 tokens, 16 new tokens a choice
(EOS held off on both sides: min_tokens served, a logit bias raw), temperature 0.8. The served choices prefill the
prompt once (the others copy its cache); the raw calls start from an empty cache, and the second to fourth reuse
the first one's prompt.

    .venv/bin/python bench/choices.py [--rounds 3]
"""

from __future__ import annotations

import statistics
import time

from common import arguments, record, start_mesh, tiny_models

from zinfer.shared.tinymodels import make_small_llama

N, NEW, SEED = 4, 16, 7


def main() -> None:
    args = arguments(3)
    small = make_small_llama(tiny_models()["pytorch"].parent)
    prompt = "Once upon a time there was a village by the sea where the fishermen sang at night. " * 50

    import llama_cpp

    raw_model = llama_cpp.Llama(str(small["small_gguf"]), n_ctx=2048, verbose=False)
    never = {t: float("-inf") for t in range(raw_model.n_vocab())
             if llama_cpp.llama_vocab_is_eog(raw_model._model.vocab, t)}

    def raw() -> list[str]:
        # From an empty cache, as the served request starts: the first call prefills the prompt, the next three
        # reuse it (create_completion keeps the prefix it shares with the last call's tokens).
        raw_model.reset()
        return [raw_model.create_completion(prompt, max_tokens=NEW, temperature=0.8, seed=SEED + i,
                                            logit_bias=never)["choices"][0]["text"] for i in range(N)]

    mesh = start_mesh()
    try:
        c = mesh.client
        c.register_model("LLM", {"model_name": "bench-small", "model_lang": ["en"], "model_ability": ["generate"],
                                 "context_length": 2048, "model_specs": [
                                     {"model_format": "ggufv2", "model_size_in_billions": 1, "quantizations": ["F32"],
                                      "model_uri": str(small["small_gguf"]),
                                      "model_file_name_template": "small-llama.{quantization}.gguf"}]})
        c.launch_model(model_name="bench-small", model_format="ggufv2", model_uid="gg-small")
        handle = c.get_model("gg-small")

        def served() -> list[str]:
            out = handle.generate(prompt, {"max_tokens": NEW, "temperature": 0.8, "seed": SEED, "n": N,
                                           "min_tokens": NEW})
            return [choice["text"] for choice in out["choices"]]

        prompt_tokens = handle.generate(prompt, {"max_tokens": 1})["usage"]["prompt_tokens"]
        # create_completion goes on past max_tokens while its last token ends inside a UTF-8 character
        assert all(g and w.startswith(g) for g, w in zip(served(), raw(), strict=True)), \
            "the served choices differ from create_completion's with the same seeds"
        times: dict[str, list[float]] = {"raw": [], "served": []}
        for _ in range(args.rounds):  # interleaved, so that a busy moment hits both sides alike
            for name, fn in (("raw", raw), ("served", served)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        mesh.stop()
        raw_model.close()
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["raw"] / median["served"]
    print(f"n={N} choices of a {prompt_tokens}-token prompt, {NEW} new tokens each: raw create_completion x{N} "
          f"{median['raw'] * 1000:.0f} ms, served n={N} {median['served'] * 1000:.0f} ms -> {ratio:.2f}x raw")
    record("choices", {"model": "random Llama 512x8 (F32 GGUF)", "prompt_tokens": prompt_tokens, "n": N,
                       "new_tokens": NEW, "raw_ms": round(median["raw"] * 1000, 1),
                       "served_ms": round(median["served"] * 1000, 1), "ratio": round(ratio, 2)})


if __name__ == "__main__":
    main()

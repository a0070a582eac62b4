"""Generation: served (through the mesh) against the raw engine, same model, same run.

Single stream tokens/s and time to first token; 1/4/16/64 concurrent streams aggregate tokens/s. For
transformers both served paths are measured: continuous batching (the default) and the plain path
(continuous_batching=false, one `generate` per request); the raw baselines are eager `generate` (one stream)
and a static batch of N prompts. For llama.cpp: raw `create_completion` against served.

    .venv/bin/python bench/generate.py [--engine transformers|llama|both] [--tokens 128] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

from common import StreamCrowd, big_llama, record, start_mesh, tiny_models

PROMPTS = [f"Stream number {i} tells the story of" for i in range(64)]


def raw_transformers(path, device, tokens, levels):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id)

    class FirstToken:
        def __init__(self):
            self.t, self.n = None, 0

        def put(self, value):
            self.n += 1
            if self.n == 2 and self.t is None:  # the first put is the prompt
                self.t = time.perf_counter()

        def end(self):
            pass

    def one(prompt):
        ids = tok(prompt, return_tensors="pt").to(device)
        streamer = FirstToken()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=tokens, streamer=streamer, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out.shape[1] - ids.input_ids.shape[1], streamer.t - start

    one(PROMPTS[0])
    runs = [one(PROMPTS[i]) for i in range(3)]
    el, n, ttft = min(runs)
    result = {"tok_s_1": n / el, "ttft_ms": ttft * 1000}
    for level in levels:
        ids = tok(PROMPTS[:level], return_tensors="pt", padding=True).to(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=tokens, **kw)
        el = time.perf_counter() - start
        result[f"static_batch_{level}"] = level * (out.shape[1] - ids.input_ids.shape[1]) / el
    return result


def raw_llama(path, device, tokens):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=2048, n_gpu_layers=-1 if device == "cuda" else 0, verbose=False)
    llm.create_completion(PROMPTS[0], max_tokens=8, temperature=0)
    best = None
    for i in range(3):
        start = time.perf_counter()
        first = None
        n = 0
        for _chunk in llm.create_completion(PROMPTS[i], max_tokens=tokens, temperature=0, stream=True):
            first = first or time.perf_counter() - start
            n += 1
        el = time.perf_counter() - start
        full = llm.create_completion(PROMPTS[i], max_tokens=tokens, temperature=0)
        start = time.perf_counter()
        llm.create_completion(PROMPTS[i], max_tokens=tokens, temperature=0)
        el = time.perf_counter() - start
        run = (full["usage"]["completion_tokens"] / el, first * 1000)
        best = run if best is None or run[0] > best[0] else best
    llm.close()
    return {"tok_s_1": best[0], "ttft_ms": best[1]}


def served(mesh, uid, tokens, levels):
    StreamCrowd(mesh, uid, PROMPTS[:1], 8).run()  # warm
    singles = [StreamCrowd(mesh, uid, [PROMPTS[i]], tokens).run() for i in range(3)]
    el, n, first = min(singles, key=lambda r: r[0] / max(1, r[1]))
    result = {"tok_s_1": n / el, "ttft_ms": first[0] * 1000}
    for level in levels:
        el, n, _ = StreamCrowd(mesh, uid, PROMPTS[:level], tokens).run()
        result[f"concurrent_{level}"] = n / el
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="both", choices=["transformers", "llama", "both"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--levels", default="1,4,16,64")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    models = tiny_models()
    hf_path = big_llama(args.device) if args.device == "cuda" else models["pytorch"]
    report: dict = {"device": args.device, "tokens": args.tokens, "model": str(hf_path.name)}

    if args.engine in ("transformers", "both"):
        report["raw_transformers"] = raw_transformers(hf_path, args.device, args.tokens, levels)
    if args.engine in ("llama", "both"):
        report["raw_llama"] = raw_llama(models["gguf"], args.device, args.tokens)

    mesh = start_mesh(workers=("cuda:0",) if args.device == "cuda" else ("cpu",))
    try:
        c = mesh.client
        spec = [{"model_format": "pytorch", "model_size_in_billions": 1, "quantizations": ["none"],
                 "model_uri": str(hf_path)},
                {"model_format": "ggufv2", "model_size_in_billions": 1, "quantizations": ["F32"],
                 "model_file_name_template": "tiny-llama.{quantization}.gguf", "model_uri": str(models["gguf_dir"])}]
        c.register_model("LLM", {"model_name": "bench-llm", "model_lang": ["en"], "model_ability": ["generate"],
                                 "context_length": 2048, "model_specs": spec})
        if args.engine in ("transformers", "both"):
            c.launch_model(model_name="bench-llm", model_format="pytorch", model_uid="hf-cb",
                           continuous_batching=True)
            report["served_transformers_cb"] = served(mesh, "hf-cb", args.tokens, levels)
            c.terminate_model("hf-cb")
            c.launch_model(model_name="bench-llm", model_format="pytorch", model_uid="hf-plain",
                           continuous_batching=False)
            report["served_transformers_plain"] = served(mesh, "hf-plain", args.tokens, levels[:3])
            c.terminate_model("hf-plain")
        if args.engine in ("llama", "both"):
            c.launch_model(model_name="bench-llm", model_format="ggufv2", model_uid="gg")
            report["served_llama"] = served(mesh, "gg", args.tokens, levels[:2])
    finally:
        mesh.stop()

    print(f"{'':<44}{'tokens/s':>10}{'TTFT ms':>9}{'ratio':>8}")
    if "raw_transformers" in report:
        raw = report["raw_transformers"]
        print(f"{'transformers raw eager generate, 1 stream':<44}{raw['tok_s_1']:>10,.0f}{raw['ttft_ms']:>9.1f}")
        for key, label in (("served_transformers_plain", "served plain path"),
                           ("served_transformers_cb", "served continuous batching")):
            s = report[key]
            report[f"ratio_{key}_1"] = round(s["tok_s_1"] / raw["tok_s_1"], 3)
            print(f"{label + ', 1 stream':<44}{s['tok_s_1']:>10,.0f}{s['ttft_ms']:>9.1f}"
                  f"{s['tok_s_1'] / raw['tok_s_1']:>8.2f}")
        cb = report["served_transformers_cb"]
        for level in levels:
            st = raw[f"static_batch_{level}"]
            sv = cb[f"concurrent_{level}"]
            print(f"{f'{level} streams: served CB vs raw static batch':<44}{sv:>10,.0f}{'':>9}{sv / st:>8.2f}"
                  f"   (raw {st:,.0f}; {sv / cb['tok_s_1']:.1f}x one served stream)")
        report["cb_16_vs_one_stream"] = round(cb.get("concurrent_16", 0) / cb["tok_s_1"], 2)
    if "raw_llama" in report:
        raw, s = report["raw_llama"], report["served_llama"]
        report["ratio_llama_1"] = round(s["tok_s_1"] / raw["tok_s_1"], 3)
        print(f"{'llama.cpp raw create_completion, 1 stream':<44}{raw['tok_s_1']:>10,.0f}{raw['ttft_ms']:>9.1f}")
        print(f"{'llama.cpp served, 1 stream':<44}{s['tok_s_1']:>10,.0f}{s['ttft_ms']:>9.1f}"
              f"{s['tok_s_1'] / raw['tok_s_1']:>8.2f}")
        for level in levels[:2]:
            print(f"{f'llama.cpp served, {level} streams (queued)':<44}{s[f'concurrent_{level}']:>10,.0f}")
    record("generate", report)


if __name__ == "__main__":
    main()

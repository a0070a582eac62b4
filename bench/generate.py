"""Generation: served (through the mesh) against the raw engine, same model, same run.

Single stream tokens/s and time to first token; 1/4/16/64 concurrent streams aggregate tokens/s. For
transformers both served paths are measured: continuous batching (the default) and the plain path
(continuous_batching=false, one `generate` per request); the raw baselines are eager `generate` (one stream)
and a static batch of N prompts. For llama.cpp, on the tiny model and a small random Llama (hidden 512, 8 layers,
built when missing): a raw multi-sequence llama_decode loop over the same prompts (1 and 16 sequences) against
1 and 16 served streams, 128 tokens each with EOS ignored.

    .venv/bin/python bench/generate.py [--engine transformers|llama|both] [--tokens 128] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

from common import StreamCrowd, big_llama, record, start_mesh, tiny_models

from zinfer.shared.tinymodels import make_small_llama

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
    for level in levels:  # best of 3, as the served crowds
        ids = tok(PROMPTS[:level], return_tensors="pt", padding=True).to(device)
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=tokens, **kw)
            el = time.perf_counter() - start
            best = max(best, level * (out.shape[1] - ids.input_ids.shape[1]) / el)
        result[f"static_batch_{level}"] = best
    return result


def raw_llama_loop(path, prompts, tokens: int | list[int], device="cpu", ctx_per_seq=2048, repeat=3):
    """Raw llama.cpp through llama-cpp-python's low-level API, the best a server can do with it: every prompt a
    sequence of one context (its own ctx_per_seq cells, as the served backend), all prompts prefilled in one
    llama_decode, then one llama_decode per step for all sequences, greedy argmax, `tokens` each (EOS ignored).
    Threads, batch size and attention as the served backend (llama-cpp-python Llama's defaults). The Python
    between decodes is as lean as the served backend's (the batch's arrays fetched once, one argmax over a kept
    numpy view of the logits per step): on the tiny model a decode is ~45 us, and np.ctypeslib.as_array per
    token alone would cost the baseline 3%. `tokens` may give each sequence its own count: a sequence that has
    its tokens leaves the batch and the others keep their sequence ids (as llama.cpp's server keeps a request in
    its slot). Best of `repeat` after a warm run; returns (tokens/s over all sequences, ms to the first
    tokens)."""
    import ctypes
    import os

    import llama_cpp
    import numpy as np
    from llama_cpp import _internals as internals

    llama_cpp._logger.set_verbose(False)
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = -1 if device == "cuda" else 0
    model = internals.LlamaModel(path_model=str(path), params=mparams, verbose=False)
    n = len(prompts)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = ctx_per_seq * n, 512, 512, n, False
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cpus = os.cpu_count() or 1
    cp.n_threads, cp.n_threads_batch = max(cpus // 2, 1), cpus
    ctx = internals.LlamaContext(model=model, params=cp, verbose=False)
    memory = llama_cpp.llama_get_memory(ctx.ctx)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model.model))
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    b_token, b_pos, b_nseq, b_seq, b_logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
    get_logits = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(("llama_get_logits", llama_cpp.llama_cpp._lib))
    views: dict = {}
    ids = [model.tokenize(p.encode(), add_bos=True, special=True) for p in prompts]
    assert sum(map(len, ids)) <= 512

    def put(i, token, pos, seq, logits):
        b_token[i], b_pos[i], b_nseq[i], b_logits[i] = token, pos, 1, logits
        b_seq[i][0] = seq

    lengths = tokens if isinstance(tokens, list) else [tokens] * n

    def argmax_rows(rows):
        key = get_logits(ctx.ctx)
        view = views.get(key)
        if view is None:
            view = views[key] = np.frombuffer((ctypes.c_float * (n * n_vocab)).from_address(key),
                                              dtype=np.float32).reshape(n, n_vocab)
        return (view if rows == n else view[:rows]).argmax(axis=1).tolist()

    def once():
        llama_cpp.llama_memory_clear(memory, True)
        start = time.perf_counter()
        i = 0
        for seq, toks in enumerate(ids):
            for pos, token in enumerate(toks):
                put(i, token, pos, seq, pos == len(toks) - 1)
                i += 1
        batch.n_tokens = i
        assert llama_cpp.llama_decode(ctx.ctx, batch) == 0
        positions = [len(t) for t in ids]
        first = None
        active = list(range(n))  # the sequences of the last decode's rows, in row order
        for step in range(max(lengths)):
            nxt = argmax_rows(len(active))  # the prefill's outputs are each prompt's last token
            first = first or time.perf_counter() - start
            active = [(seq, token) for seq, token in zip(active, nxt, strict=True) if step < lengths[seq] - 1]
            if not active:
                break
            for i, (seq, token) in enumerate(active):
                put(i, token, positions[seq], seq, True)
                positions[seq] += 1
            active = [seq for seq, _ in active]
            batch.n_tokens = len(active)
            assert llama_cpp.llama_decode(ctx.ctx, batch) == 0
        return time.perf_counter() - start, first

    once()
    el, first = min(once() for _ in range(repeat * (4 if n == 1 else 1)))
    llama_cpp.llama_batch_free(batch)
    ctx.close()
    model.close()
    return {"tok_s": sum(lengths) / el, "ttft_ms": first * 1000}


def served(mesh, uid, tokens, levels, ignore_eos=False):
    # Each crowd runs once untimed: its sockets connect (a CURVE handshake each) and the engine warms, as a
    # client's connection does once; the raw loops' model and context are likewise made before their clocks.
    crowds = [StreamCrowd(mesh, uid, [PROMPTS[i]], tokens, ignore_eos) for i in range(4)]
    for crowd in crowds:
        crowd.run()
    singles = [crowds[i % 4].run() for i in range(12)]
    el, n, first = min(singles, key=lambda r: r[0] / max(1, r[1]))
    result = {"tok_s_1": n / el, "ttft_ms": first[0] * 1000}
    for level in levels:
        crowd = StreamCrowd(mesh, uid, PROMPTS[:level], tokens, ignore_eos)
        crowd.run()
        runs = [crowd.run() for _ in range(3)]  # best of 3, as the raw baselines
        result[f"concurrent_{level}"] = max(n / el for el, n, _ in runs)
    return result


def llama_rows(mesh, uid, path, device, tokens):
    """llama.cpp served against the raw multi-sequence loop on the same model: 1 and 16 streams; and 16 streams
    of alternate lengths (tokens/4 and tokens), where half the slots empty early: llama.cpp decodes sequences in
    one micro-batch only while their slots follow each other, so the raw loop's 8 survivors in alternate slots
    decode one micro-batch each, where the served backend closes the holes (slots.py)."""
    raw1 = raw_llama_loop(path, PROMPTS[:1], tokens, device)
    raw16 = raw_llama_loop(path, PROMPTS[:16], tokens, device)
    s = served(mesh, uid, tokens, [16], ignore_eos=True)
    mixed = [tokens // 4 if i % 2 == 0 else tokens for i in range(16)]
    raw_mixed = raw_llama_loop(path, PROMPTS[:16], mixed, device)
    crowd = StreamCrowd(mesh, uid, PROMPTS[:16], mixed, ignore_eos=True)
    crowd.run()
    served_mixed = max(n / el for el, n, _ in (crowd.run() for _ in range(3)))
    return {"raw_1": raw1["tok_s"], "raw_16": raw16["tok_s"], "served_1": s["tok_s_1"],
            "served_16": s["concurrent_16"], "ratio_1": round(s["tok_s_1"] / raw1["tok_s"], 3),
            "ratio_16": round(s["concurrent_16"] / raw16["tok_s"], 3),
            "served_16_vs_1": round(s["concurrent_16"] / s["tok_s_1"], 2), "ttft_ms": s["ttft_ms"],
            "raw_16_alternate_lengths": raw_mixed["tok_s"], "served_16_alternate_lengths": served_mixed,
            "ratio_16_alternate_lengths": round(served_mixed / raw_mixed["tok_s"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="both", choices=["transformers", "llama", "both"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--neighbours", action=argparse.BooleanOptionalAction, default=True,
                    help="llama.cpp rows with idle transformers and embedding instances on the same device")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    models = tiny_models()
    hf_path = big_llama(args.device) if args.device == "cuda" else models["pytorch"]
    report: dict = {"device": args.device, "tokens": args.tokens, "model": str(hf_path.name)}

    if args.engine in ("transformers", "both"):
        report["raw_transformers"] = raw_transformers(hf_path, args.device, args.tokens, levels)
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
            if args.neighbours:
                # Idle neighbours on the same device, as a served llama.cpp instance has them: a continuous-batching
                # transformers instance that has served 16 streams, and an embedding instance that has served.
                c.launch_model(model_name="bench-llm", model_format="pytorch", model_uid="hf-neighbour",
                               continuous_batching=True)
                StreamCrowd(mesh, "hf-neighbour", PROMPTS[:16], args.tokens).run()
                c.register_model("embedding", {"model_name": "bench-minilm", "dimensions": 384, "max_tokens": 256,
                                               "language": ["en"], "model_uri": str(models["embedding"])})
                c.launch_model(model_name="bench-minilm", model_type="embedding", model_uid="emb-neighbour")
                c.get_model("emb-neighbour").embed_array(PROMPTS[:64])
                report["llama_neighbours"] = ["hf-neighbour (transformers, continuous batching)", "emb-neighbour"]
            small = make_small_llama(models["pytorch"].parent)  # built once (seconds), kept with the tiny models
            c.register_model("LLM", {"model_name": "bench-small", "model_lang": ["en"],
                                     "model_ability": ["generate"], "context_length": 2048, "model_specs": [
                                         {"model_format": "ggufv2", "model_size_in_billions": 1,
                                          "quantizations": ["F32"], "model_uri": str(small["small_gguf"]),
                                          "model_file_name_template": "small-llama.{quantization}.gguf"}]})
            for name, model, path in (("tiny", "bench-llm", models["gguf"]), ("small", "bench-small",
                                                                               small["small_gguf"])):
                c.launch_model(model_name=model, model_format="ggufv2", model_uid=f"gg-{name}")
                report[f"llama_{name}"] = llama_rows(mesh, f"gg-{name}", path, args.device, args.tokens)
                c.terminate_model(f"gg-{name}")
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
    for name in ("tiny", "small"):
        if f"llama_{name}" in report:
            r = report[f"llama_{name}"]
            print(f"llama.cpp, {name} model: raw loop 1 seq {r['raw_1']:,.0f} tok/s, 16 seqs {r['raw_16']:,.0f} "
                  f"({r['raw_16'] / r['raw_1']:.2f}x)")
            print(f"  served 1 stream {r['served_1']:,.0f} tok/s = {r['ratio_1']:.2f}x raw (target >= 0.95); "
                  f"16 streams {r['served_16']:,.0f} = {r['ratio_16']:.2f}x raw 16 (target >= 0.7), "
                  f"{r['served_16_vs_1']:.2f}x one served stream")
            print(f"  16 streams of alternate lengths: raw loop (slots kept) {r['raw_16_alternate_lengths']:,.0f} "
                  f"tok/s, served {r['served_16_alternate_lengths']:,.0f} = {r['ratio_16_alternate_lengths']:.2f}x")
    record("generate", report)


if __name__ == "__main__":
    main()

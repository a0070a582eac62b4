"""GGUF embeddings: served (llama.cpp through the mesh, batched across requests) against raw llama-cpp-python
`embed` on the same file, same run. The model is MiniLM-L6 converted to GGUF (F32); with --model tiny the tiny
BERT of the tests (where per-call overhead, not arithmetic, is the cost); with --model base a BERT of
bge-base's shape (768 wide, 12 layers, 110M parameters; random weights, MiniLM's vocabulary).

    .venv/bin/python bench/embed_gguf.py [--model minilm|tiny|base] [--rounds 3]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from common import MODELS, arguments, record, start_mesh, timed, tiny_models
from embed import ClientCrowd, latencies

from zinfer.shared import protocol as p
from zinfer.shared.tinymodels import convert_bert_to_gguf


def base_bert(minilm: Path, out: Path) -> Path:
    """A sentence-transformers folder of bge-base's shape: random BERT weights (seeded), MiniLM's tokenizer and
    mean pooling."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    if not (out / "model.safetensors").exists():
        torch.manual_seed(0)
        config = BertConfig(vocab_size=json.loads((minilm / "config.json").read_text())["vocab_size"],
                            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            max_position_embeddings=512)
        BertModel(config).save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (minilm / name).exists():
                shutil.copy(minilm / name, out / name)
        shutil.copytree(minilm / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
    return out


def main() -> None:
    args = arguments(3, ("--model", {"default": "minilm", "choices": ["minilm", "tiny", "base"]}))
    models = tiny_models()
    if args.model == "tiny":
        path, dims = models["embedding_gguf"], 64
    elif args.model == "base":
        path, dims = MODELS / "embed-gguf" / "bert-base-random.F32.gguf", 768
        if not path.exists():
            convert_bert_to_gguf(base_bert(models["embedding"], MODELS / "bert-base-random"), path)
    else:
        path, dims = MODELS / "embed-gguf" / "minilm.F32.gguf", 384
        if not path.exists():
            convert_bert_to_gguf(models["embedding"], path)
    subjects = ["whales", "octopuses", "the sea", "zinfer", "a dragon", "the village", "fishermen", "models"]
    verbs = ["sleep", "eat", "grow", "travel", "sing", "hide", "work", "learn"]
    sentences = [f"how do {subjects[i % 8]} {verbs[(i // 8) % 8]} at night {i}" for i in range(256)]

    import llama_cpp

    raw_model = llama_cpp.Llama(str(path), embedding=True, verbose=False)
    raw_model.embed(sentences[:8], normalize=True)
    raw = {"seq64": 64 / timed(lambda: [raw_model.embed(s, normalize=True) for s in sentences[:64]], args.rounds),
           "batch32": 32 / timed(lambda: raw_model.embed(sentences[:32], normalize=True), args.rounds)}

    mesh = start_mesh(workers=("cpu",))
    try:
        c = mesh.client
        c.register_model("embedding", {
            "version": 2, "model_name": "bench-gguf-embed", "dimensions": dims, "max_tokens": 512,
            "language": ["en"], "model_specs": [{"model_format": "ggufv2", "quantization": "F32",
                                                 "model_file_name_template": path.name.replace("F32", "{quantization}"),
                                                 "model_uri": str(path.parent)}]})
        c.launch_model(model_name="bench-gguf-embed", model_type="embedding", model_uid="emb")
        handle = c.get_model("emb")
        got = handle.embed_array(sentences[:4])
        want = np.asarray(raw_model.embed(sentences[:4], normalize=True), dtype=np.float32)
        assert float((got * want).sum(1).min()) >= 0.999, "served vectors differ from llama-cpp-python's"
        served = {"batch32": 32 / timed(lambda: handle.embed_array(sentences[:32]), args.rounds)}
        burst = ClientCrowd(mesh, "emb", sentences[:64])
        burst.run()
        served["conc64"] = 64 / timed(burst.run, args.rounds)
        one = sentences[7]
        raw_lat, served_lat, ping_lat = [], [], []
        for _ in range(args.rounds * 4):  # interleaved, so that drift of the machine falls on both alike
            raw_lat += latencies(lambda: raw_model.embed(one, normalize=True), 25)
            served_lat += latencies(lambda: handle.embed_array([one]), 25)
            # the mesh's floor: a ping that the instance's I/O thread answers, through the broker both ways
            ping_lat += latencies(lambda: c.ping(p.model_target("emb")), 25)
        raw["p50_ms_one"], served["p50_ms_one"] = float(np.median(raw_lat)), float(np.median(served_lat))
        served["p50_ms_ping"] = float(np.median(ping_lat))
    finally:
        mesh.stop()
        raw_model.close()

    one_ratio = raw["p50_ms_one"] / served["p50_ms_one"]
    conc_ratio = served["conc64"] / raw["seq64"]
    print(f"model {args.model} ({path.name})")
    print(f"one sentence p50: raw embed {raw['p50_ms_one']:.2f} ms, served {served['p50_ms_one']:.2f} ms -> "
          f"{one_ratio:.2f}x (target >= 0.9x)")
    print(f"  a ping to the instance through the broker: {served['p50_ms_ping']:.2f} ms; 0.9x allows "
          f"{raw['p50_ms_one'] / 0.9 - raw['p50_ms_one']:.2f} ms over raw")
    print(f"64 clients x 1: raw sequential {raw['seq64']:,.0f}/s, served {served['conc64']:,.0f}/s -> "
          f"{conc_ratio:.2f}x (target >= 3x)")
    print(f"batch of 32: raw embed {raw['batch32']:,.0f}/s, served {served['batch32']:,.0f}/s -> "
          f"{served['batch32'] / raw['batch32']:.2f}x")
    record("embed_gguf", {"model": args.model, "raw": raw, "served": served, "ratio_one_p50": round(one_ratio, 3),
                          "ratio_conc64_vs_sequential": round(conc_ratio, 3),
                          "ratio_batch32": round(served["batch32"] / raw["batch32"], 3)})


if __name__ == "__main__":
    main()

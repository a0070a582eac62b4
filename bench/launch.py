"""Launch-to-ready through the mesh against the raw load time of the same model, same run.

The raw side loads with the engine's own call in this (warm) process; the served side is
client.launch_model(...) returning ready: placement, a new instance process forked from the worker's fork
server (which imported the engines when the worker started), the load in that process, and its bind. Every
launch is a new process; no launch warms another. The first launch of the run is also shown: it may wait for
the fork server's imports when it comes right after the worker started.

    .venv/bin/python bench/launch.py [--rounds 3]
"""

from __future__ import annotations

import time

from common import arguments, record, start_mesh, tiny_models


def raw_loads(models) -> dict[str, float]:
    import torch
    from llama_cpp import Llama
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def transformers_load():
        AutoTokenizer.from_pretrained(models["pytorch"])
        AutoModelForCausalLM.from_pretrained(models["pytorch"], dtype=torch.float32).eval()

    def llama_load():
        Llama(model_path=str(models["gguf"]), n_ctx=2048, verbose=False).close()

    def st_load():
        SentenceTransformer(str(models["embedding"]), device="cpu")

    out = {}
    for name, fn in (("pytorch", transformers_load), ("ggufv2", llama_load), ("embedding", st_load)):
        fn()  # warm: imports and file cache
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = min(times)
    return out


def main() -> None:
    args = arguments(3)
    models = tiny_models()
    raw = raw_loads(models)
    mesh = start_mesh()
    served = {}
    try:
        c = mesh.client
        c.register_model("LLM", {
            "model_name": "bench-llm", "model_lang": ["en"], "model_ability": ["generate"],
            "model_specs": [
                {"model_format": "pytorch", "model_size_in_billions": 1, "quantizations": ["none"],
                 "model_uri": str(models["pytorch"])},
                {"model_format": "ggufv2", "model_size_in_billions": 1, "quantizations": ["F32"],
                 "model_file_name_template": "tiny-llama.{quantization}.gguf",
                 "model_uri": str(models["gguf_dir"])}]})
        c.register_model("embedding", {"model_name": "bench-minilm", "dimensions": 384, "max_tokens": 256,
                                       "language": ["en"], "model_uri": str(models["embedding"])})
        cases = {"pytorch": dict(model_name="bench-llm", model_format="pytorch"),
                 "ggufv2": dict(model_name="bench-llm", model_format="ggufv2"),
                 "embedding": dict(model_name="bench-minilm", model_type="embedding")}
        first = None
        for name, kw in cases.items():
            times = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                uid = c.launch_model(model_uid="timed", **kw)
                times.append(time.perf_counter() - start)
                first = times[0] if first is None else first
                c.terminate_model(uid)
            served[name] = min(times)
    finally:
        mesh.stop()
    print(f"{'model':<12}{'raw load s':>12}{'served launch s':>17}{'overhead s':>12}   (target: <= raw + 1.5 s)")
    for name in raw:
        print(f"{name:<12}{raw[name]:>12.3f}{served[name]:>17.3f}{served[name] - raw[name]:>12.3f}")
    print(f"first launch after the worker started: {first:.3f} s")
    record("launch", {"raw_s": raw, "served_s": served, "first_launch_s": round(first, 3),
                      "overhead_s": {k: round(served[k] - raw[k], 3) for k in raw}})


if __name__ == "__main__":
    main()

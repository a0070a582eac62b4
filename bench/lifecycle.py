"""Load on request: the time from a request to an idle-unloaded instance to its answer (the load, then the
request), against a plain launch followed by the same request, same model, same run, interleaved. For a llama.cpp
instance (the small 27M-parameter Llama as GGUF F32, 104 MB) and an embedding instance (MiniLM-L6).

    .venv/bin/python bench/lifecycle.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import psutil
from common import record, start_mesh, tiny_models

from zinfer.shared.tinymodels import make_small_llama

PROMPT = "Once upon a time"


def main() -> None:
    ap = argparse.ArgumentParser(description="request to an unloaded instance vs launch + request")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are printed)")
    args = ap.parse_args()
    small = make_small_llama((models := tiny_models())["pytorch"].parent)
    mesh = start_mesh()
    cases = {
        "llama.cpp": (dict(model_name="bench-small", model_format="ggufv2", quantization="F32"),
                      lambda h: h.generate(PROMPT, {"max_tokens": 8, "temperature": 0})),
        "embedding": (dict(model_name="bench-minilm", model_type="embedding"),
                      lambda h: h.create_embedding("how do whales sleep at night")),
    }
    results: dict[str, dict[str, list[float]]] = {name: {"launch": [], "on_request": []} for name in cases}
    try:
        c = mesh.client
        c.register_model("LLM", {"model_name": "bench-small", "model_lang": ["en"], "model_ability": ["generate"],
                                 "context_length": 2048, "model_specs": [
                                     {"model_format": "ggufv2", "model_size_in_billions": 1, "quantizations": ["F32"],
                                      "model_file_name_template": "small-llama.{quantization}.gguf",
                                      "model_uri": str(small["small_gguf_dir"])}]})
        c.register_model("embedding", {"model_name": "bench-minilm", "dimensions": 384, "max_tokens": 256,
                                       "language": ["en"], "model_uri": str(models["embedding"])})
        for _ in range(args.rounds):
            for name, (launch, ask) in cases.items():
                uid = f"plain-{name.replace('.', '')}"
                start = time.perf_counter()  # a plain launch, waited for, then the request
                c.launch_model(model_uid=uid, **launch)
                ask(c.get_model(uid))
                results[name]["launch"].append(time.perf_counter() - start)
                c.terminate_model(uid)
                uid = f"lazy-{name.replace('.', '')}"
                c.launch_model(model_uid=uid, keep_alive=0, **launch)
                handle = c.get_model(uid)
                ask(handle)  # served once; keep_alive 0 unloads it after the reply
                pid = c.describe_model(uid)["pids"][0]
                mesh.wait(lambda u=uid: c.describe_model(u)["state"] == "idle-unloaded", timeout=60)
                mesh.wait(lambda p=pid: not psutil.pid_exists(p), timeout=60)  # gone, as after a real idle spell
                start = time.perf_counter()  # the request to the unloaded instance: loaded, then answered
                ask(handle)
                results[name]["on_request"].append(time.perf_counter() - start)
                c.terminate_model(uid)
    finally:
        mesh.stop()

    out = {}
    for name, runs in results.items():
        launch, lazy = float(np.median(runs["launch"])), float(np.median(runs["on_request"]))
        print(f"{name:<10} launch + request {launch * 1000:7.0f} ms   request to an unloaded instance "
              f"{lazy * 1000:7.0f} ms   ratio {lazy / launch:.2f}")
        out[name] = {"launch_then_request_ms": round(launch * 1000, 1), "request_to_unloaded_ms": round(lazy * 1000, 1),
                     "ratio": round(lazy / launch, 3)}
    record("lifecycle", {"rounds": args.rounds, **out})


if __name__ == "__main__":
    main()

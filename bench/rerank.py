"""Rerank: 1 query x 100 documents served (through the mesh) against raw CrossEncoder.predict on the same pairs,
same model, same run, interleaved. The model is MiniLM's weights (6 layers, 22M parameters) with a one-label
scoring head: a cross-encoder of ms-marco-MiniLM's size, built here with no download. Also 16 clients at once,
each 1 x 20 documents, against raw predict of the same pairs one request at a time.

    .venv/bin/python bench/rerank.py [--device cpu|cuda] [--rounds 5]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from common import arguments, concurrently, record, start_mesh, tiny_models

from zinfer.shared.tinymodels import build_tiny_reranker


def median_ms(fn, n: int) -> float:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return float(np.median(out))


def main() -> None:
    args = arguments(5, ("--device", {"default": "cpu", "choices": ["cpu", "cuda"]}))
    models = tiny_models()
    folder = Path(tempfile.mkdtemp(prefix="zinfer-bench-rerank-")) / "minilm-reranker"
    build_tiny_reranker(folder, source=models["embedding"])
    query = "what is the largest animal that has ever lived in the sea"
    documents = [f"Passage {i}: the {['blue whale', 'fin whale', 'octopus', 'village', 'fisherman'][i % 5]} "
                 f"{['is the largest animal', 'tells stories at night', 'has three hearts', 'sleeps'][i % 4]} "
                 f"and {i % 7} more facts about the sea follow here." for i in range(100)]

    from sentence_transformers import CrossEncoder

    raw_model = CrossEncoder(str(folder), device=args.device, max_length=512)
    if args.device == "cuda":
        raw_model.half()
    pairs = [(query, d) for d in documents]
    expected = raw_model.predict(pairs, show_progress_bar=False)

    mesh = start_mesh(workers=("cuda:0",) if args.device == "cuda" else ("cpu",))
    try:
        c = mesh.client
        c.register_model("rerank", {"version": 2, "model_name": "bench-reranker", "type": "normal",
                                    "language": ["en"], "max_tokens": 512,
                                    "model_specs": [{"model_format": "pytorch", "model_uri": str(folder),
                                                     "quantization": "none"}]})
        c.launch_model(model_name="bench-reranker", model_type="rerank", model_uid="rr")
        handle = c.get_model("rr")
        served_scores = {r["index"]: r["relevance_score"] for r in handle.rerank(documents, query)["results"]}
        worst = max(abs(served_scores[i] - float(expected[i])) for i in range(len(documents)))
        raw_ms, served_ms = [], []
        for _ in range(args.rounds):  # interleaved, so that drift of the machine falls on both alike
            raw_ms.append(median_ms(lambda: raw_model.predict(pairs, show_progress_bar=False), 5))
            served_ms.append(median_ms(lambda: handle.rerank(documents, query), 5))
        handles = [mesh.new_client().get_model("rr") for _ in range(16)]
        chunks = [documents[(i * 20) % 100:(i * 20) % 100 + 20] for i in range(16)]
        seq_ms = median_ms(lambda: [raw_model.predict([(query, d) for d in ch], show_progress_bar=False)
                                    for ch in chunks], args.rounds)
        conc_ms = median_ms(lambda: concurrently(16, lambda i: handles[i].rerank(chunks[i], query)), args.rounds)
    finally:
        mesh.stop()

    raw_p50, served_p50 = float(np.median(raw_ms)), float(np.median(served_ms))
    ratio = raw_p50 / served_p50
    print(f"1 query x 100 documents: raw CrossEncoder.predict {raw_p50:.1f} ms, served {served_p50:.1f} ms -> "
          f"{ratio:.3f}x raw speed (target >= 0.9x); largest score difference {worst:.2e}")
    print(f"16 clients x 20 documents at once: served {conc_ms:.1f} ms vs raw one request at a time {seq_ms:.1f} ms "
          f"-> {seq_ms / conc_ms:.2f}x")
    record("rerank", {"device": args.device, "raw_ms_100": round(raw_p50, 2), "served_ms_100": round(served_p50, 2),
                      "ratio_100": round(ratio, 3), "max_score_diff": worst,
                      "raw_sequential_ms_16x20": round(seq_ms, 2), "served_concurrent_ms_16x20": round(conc_ms, 2),
                      "ratio_16x20": round(seq_ms / conc_ms, 3)})


if __name__ == "__main__":
    main()

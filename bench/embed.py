"""Embedding throughput: served (through the mesh, with dynamic batching) against raw sentence-transformers,
same model, same run.

    .venv/bin/python bench/embed.py [--device cpu|cuda] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import zmq
from common import StreamCrowd, concurrently, record, start_mesh, timed, tiny_models

from zinfer.shared import protocol as p
from zinfer.shared import wire
from zinfer.shared.transport import send_frames


class ClientCrowd:
    """64 clients, each its own DEALER socket with one request in flight, driven from one thread so that the
    load generator is not what limits the measurement (64 Python threads on 2 cores would be)."""

    def __init__(self, mesh, uid: str, texts: list[str]):
        self.socks = [mesh.raw_socket(mesh.admin_key) for _ in texts]
        self.target = p.model_target(uid).encode()
        self.bodies = [p.encode(p.Embed(model_uid=uid, input=[t])) for t in texts]
        self.poller = zmq.Poller()
        for sock in self.socks:
            self.poller.register(sock, zmq.POLLIN)

    def run(self) -> None:
        for i, sock in enumerate(self.socks):
            send_frames(sock, wire.client_request(self.target, i.to_bytes(8, "big"), self.bodies[i]))
        pending = set(self.socks)
        while pending:
            for sock, _ in self.poller.poll(30_000):
                frames = sock.recv_multipart()
                reply = p.decode_reply(frames[2])
                if isinstance(reply, p.Error):
                    raise RuntimeError(reply.message)
                np.frombuffer(frames[3], dtype=np.float32).reshape(reply.rows, reply.dimensions)
                pending.discard(sock)


def latencies(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--long", action="store_true", help="~25-token sentences instead of ~10-token queries")
    args = ap.parse_args()
    models = tiny_models()
    subjects = ["whales", "octopuses", "the sea", "zinfer", "a dragon", "the village", "fishermen", "models"]
    verbs = ["sleep", "eat", "grow", "travel", "sing", "hide", "work", "learn"]
    if args.long:
        sentences = [f"Sentence {i}: the blue whale is the largest animal that has ever lived, {i % 13} times over."
                     for i in range(256)]
    else:  # search-query-like inputs, the common case for embedding servers
        sentences = [f"how do {subjects[i % 8]} {verbs[(i // 8) % 8]} at night {i}" for i in range(256)]

    from sentence_transformers import SentenceTransformer

    raw_model = SentenceTransformer(str(models["embedding"]), device=args.device)
    if args.device == "cuda":
        raw_model.half()
    raw_model.encode(sentences[:32])  # warm up
    raw = {}
    for batch in (1, 32, 256):
        raw[batch] = batch / timed(lambda b=batch: raw_model.encode(sentences[:b]), args.rounds)
    raw["seq64"] = 64 / timed(lambda: [raw_model.encode([s]) for s in sentences[:64]], args.rounds)
    raw["one64"] = 64 / timed(lambda: raw_model.encode(sentences[:64]), args.rounds)

    mesh = start_mesh(workers=("cuda:0",) if args.device == "cuda" else ("cpu",))
    try:
        c = mesh.client
        c.register_model("embedding", {"model_name": "bench-minilm", "dimensions": 384, "max_tokens": 256,
                                       "language": ["en"], "model_uri": str(models["embedding"])})
        c.launch_model(model_name="bench-minilm", model_type="embedding", model_uid="emb")
        handle = c.get_model("emb")
        handle.embed_array(sentences[:32])
        served = {}
        for batch in (1, 32, 256):
            served[batch] = batch / timed(lambda b=batch: handle.embed_array(sentences[:b]), args.rounds)
        burst = ClientCrowd(mesh, "emb", sentences[:64])
        burst.run()  # sockets connected, warm
        served["conc64"] = 64 / timed(burst.run, args.rounds)
        handles = [mesh.new_client().get_model("emb") for _ in range(64)]
        served["conc64_threads"] = 64 / timed(
            lambda: concurrently(64, lambda i: handles[i].embed_array(sentences[i])), args.rounds)
        # One sentence at a time, with idle neighbours on the same device: a transformers instance (continuous
        # batching) and a llama.cpp instance that have each served 16 streams and gone idle.
        c.register_model("LLM", {"model_name": "bench-neighbour", "model_lang": ["en"],
                                 "model_ability": ["generate"], "context_length": 2048, "model_specs": [
                                     {"model_format": "pytorch", "model_size_in_billions": 1,
                                      "quantizations": ["none"], "model_uri": str(models["pytorch"])},
                                     {"model_format": "ggufv2", "model_size_in_billions": 1, "quantizations": ["F32"],
                                      "model_file_name_template": "tiny-llama.{quantization}.gguf",
                                      "model_uri": str(models["gguf_dir"])}]})
        for fmt, uid in (("pytorch", "hf-neighbour"), ("ggufv2", "gg-neighbour")):
            c.launch_model(model_name="bench-neighbour", model_format=fmt, model_uid=uid, continuous_batching=True)
            StreamCrowd(mesh, uid, [f"hello {i}" for i in range(16)], 32).run()
        one = sentences[7]
        # The instance's own call (its backend: one forward pass for a small batch, without encode()'s per-call
        # overhead), in this process: what the served figure minus this costs is the mesh's path alone.
        from zinfer.services.worker.instance.backends.sentence_backend import SentenceTransformersBackend

        direct = SentenceTransformersBackend(str(models["embedding"]), args.device, 256)
        raw_lat, served_lat, direct_lat = [], [], []
        for _ in range(args.rounds * 4):  # interleaved, so that drift of the machine falls on all alike
            raw_lat += latencies(lambda: raw_model.encode([one]), 25)
            served_lat += latencies(lambda: handle.embed_array([one]), 25)
            direct_lat += latencies(lambda: direct.encode([one]), 25)
        served["p50_ms_one"] = float(np.median(served_lat))
        raw["p50_ms_one"] = float(np.median(raw_lat))
        raw["p50_ms_one_backend"] = float(np.median(direct_lat))
    finally:
        mesh.stop()

    print(f"{'case':<36}{'raw sent/s':>12}{'served sent/s':>15}{'ratio':>8}")
    rows = {}
    for batch in (1, 32, 256):
        rows[f"batch{batch}"] = (raw[batch], served[batch])
    rows["64 clients x 1 vs raw sequential"] = (raw["seq64"], served["conc64"])
    rows["64 clients x 1 vs raw one batch"] = (raw["one64"], served["conc64"])
    rows["(64 client threads in one process)"] = (raw["seq64"], served["conc64_threads"])
    for name, (r, s) in rows.items():
        print(f"{name:<36}{r:>12,.0f}{s:>15,.0f}{s / r:>8.2f}")
    extra = served["p50_ms_one"] - raw["p50_ms_one"]
    print(f"one sentence, idle transformers and llama.cpp neighbours: p50 raw encode {raw['p50_ms_one']:.2f} ms, "
          f"served {served['p50_ms_one']:.2f} ms: {extra:+.2f} ms (target <= +1 ms); the instance's own call in this "
          f"process {raw['p50_ms_one_backend']:.2f} ms: the mesh's path "
          f"{served['p50_ms_one'] - raw['p50_ms_one_backend']:+.2f} ms")
    target64 = 10 if args.device == "cuda" else 3
    print(f"\ntargets: batch 256 served >= 0.95x raw -> {served[256] / raw[256]:.2f}x; 64 clients >= {target64}x raw "
          f"sequential -> {served['conc64'] / raw['seq64']:.2f}x")
    record("embed", {"device": args.device, "inputs": "long" if args.long else "queries", "raw": raw, "served": served,
                     "ratio_batch256": round(served[256] / raw[256], 3),
                     "ratio_conc64_vs_sequential": round(served["conc64"] / raw["seq64"], 3),
                     "ratio_conc64_vs_one_batch": round(served["conc64"] / raw["one64"], 3),
                     "extra_ms_one_sentence_p50": round(extra, 2),
                     "mesh_path_ms_one_sentence_p50": round(served["p50_ms_one"] - raw["p50_ms_one_backend"], 2)})


if __name__ == "__main__":
    main()

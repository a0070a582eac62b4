"""Shared by the benchmarks: a mesh on loopback, the models, timing helpers, and the results file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.mesh import Mesh  # noqa: E402

MODELS = Path(os.environ.get("ZINFER_BENCH_MODELS", Path(tempfile.gettempdir()) / "zinfer-bench-models"))


def arguments(rounds: int, *options: tuple[str, dict]) -> argparse.Namespace:
    """A benchmark's command line: --rounds (how many times each case runs, the best or the median kept) and the
    benchmark's own options as (flag, argparse keywords) pairs."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=rounds)
    for flag, kwargs in options:
        ap.add_argument(flag, **kwargs)
    return ap.parse_args()


def machine() -> str:
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{platform.node()}: {os.cpu_count()} cpus{gpu}, Python {platform.python_version()}"


def tiny_models() -> dict[str, Path]:
    from zinfer.shared.tinymodels import make_tiny_models

    return make_tiny_models(MODELS)


def big_llama(device: str) -> Path:
    """A random-weight ~1.1B Llama (TinyLlama's shape) with the tiny tokenizer, for GPU runs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = MODELS / "llama-1b"
    if (out / "model.safetensors").exists():
        return out
    small = tiny_models()["pytorch"]
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = 1
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(small).save_pretrained(out)
    return out


def start_mesh(workers=("cpu",)) -> Mesh:
    root = Path(tempfile.mkdtemp(prefix="zinfer-bench-"))
    return Mesh(root / "home", root, heartbeat=1.0).start_all(workers=workers)


def concurrently(n: int, fn) -> list:
    results: list = [None] * n
    errors: list = []

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as exc:  # a benchmark that fails must say so
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def timed(fn, repeat: int = 1) -> float:
    """Best of `repeat` wall times, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def record(name: str, result: dict) -> None:
    result = {"bench": name, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **result}
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    with open(out / f"{name}.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"\nrecorded in bench/results/{name}.jsonl")


class StreamCrowd:
    """N clients, each its own DEALER socket streaming one generation, driven from one thread (so the load
    generator is not what limits the measurement). run() returns (seconds, total completion tokens,
    time to first chunk of each stream). Run it once before timing it: the first run pays each socket's CURVE
    handshake with the broker (a millisecond or more each), which a client pays once per connection, not per
    request; the sockets stay connected between runs."""

    def __init__(self, mesh: Mesh, uid: str, prompts: list[str], max_tokens: int | list[int], ignore_eos: bool = False,
                 loras: list[str | None] | None = None):
        import zmq

        from zinfer.shared import protocol as p
        from zinfer.shared import wire
        from zinfer.shared.payloads import GenerateConfig

        self.p, self.wire, self.zmq = p, wire, zmq
        self.socks = [mesh.raw_socket(mesh.admin_key) for _ in prompts]
        loras = loras or [None] * len(prompts)  # the LoRA adapter each stream names (None: the base model)
        self.target = p.model_target(uid).encode()
        counts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
        self.bodies = [p.encode(p.Generate(model_uid=uid, prompt=t, config=GenerateConfig(
            max_tokens=count, temperature=0.0, stream=True, ignore_eos=ignore_eos, lora_name=lora)))
            for t, lora, count in zip(prompts, loras, counts, strict=True)]
        self.runs = 0
        self.poller = zmq.Poller()
        for sock in self.socks:
            self.poller.register(sock, zmq.POLLIN)

    def run(self) -> tuple[float, int, list[float]]:
        from zinfer.shared.transport import send_frames

        p = self.p
        self.runs += 1
        start = time.perf_counter()
        for i, sock in enumerate(self.socks):
            req_id = (self.runs * len(self.socks) + i).to_bytes(8, "big")
            send_frames(sock, self.wire.client_request(self.target, req_id, self.bodies[i]))
        first: dict = {}
        tokens = 0
        open_streams = set(self.socks)
        while open_streams:
            for sock, _ in self.poller.poll(60_000):
                while True:
                    try:
                        frames = sock.recv_multipart(self.zmq.NOBLOCK)
                    except self.zmq.Again:
                        break
                    reply = p.decode_reply(frames[2])
                    if isinstance(reply, p.Error):
                        raise RuntimeError(reply.message)
                    first.setdefault(sock, time.perf_counter() - start)
                    if reply.usage is not None:  # the last chunk (the final REPLY) carries the usage
                        tokens += reply.usage.completion_tokens
                    if frames[0] == self.wire.REPLY:
                        open_streams.discard(sock)
        return time.perf_counter() - start, tokens, list(first.values())

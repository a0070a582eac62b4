"""The HTTP gateway against the ZMQ client: one load generator drives both, same models, same run.

    .venv/bin/python bench/gateway.py [--seconds 5] [--skip-start]

(Not named http.py: a script of that name in bench/ shadows the standard library's `http` for every script here.)

Rows (the issue's table, re-measured for zinfer over HTTP and over ZeroMQ):
- start to ready: `zinfer up` until the gateway's /ready says ready;
- launch of an embedding / transformers / llama.cpp model (warm), POST /v1/models?wait_ready vs launch_model;
- embed one sentence, one client: p50 / p99 (target: HTTP p50 <= ZMQ p50 + 1.5 ms);
- embed one sentence, 64 clients: sentences/s (target: HTTP >= 0.8x ZMQ);
- generate 128 greedy tokens, streamed (SSE over HTTP), 1 and 16 streams, transformers and llama.cpp:
  tokens/s (target for one stream: HTTP >= 0.9x ZMQ); one stream runs 20 generations in a row, 16 streams
  two each.
Each client is a thread with its own keep-alive HTTP connection (http.client) or its own zinfer Client; the two
paths alternate, two rounds each, and the better round counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# This file's name shadows the standard library's `http` for imports from its own folder: import what needs the
# real one (requests -> http.client) with that folder off the path, then put it back for `common`.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]
import requests  # noqa: E402

sys.path.insert(0, _HERE)
from common import REPO, record, start_mesh, tiny_models  # noqa: E402

from tests.conftest import embedding_definition, llm_definition  # noqa: E402
from tests.mesh import free_port  # noqa: E402
from zinfer.shared import keys  # noqa: E402

SENTENCE = "The blue whale is the largest animal that has ever lived."
PROMPT = "Once upon a time there was a small village by the sea"


class ZmqPath:
    name = "zmq"

    def __init__(self, mesh):
        self.mesh = mesh

    def session(self):
        return self.mesh.new_client(timeout=120)

    @staticmethod
    def handle(client, uid: str):
        """A model handle per client, made once (get_model asks the scheduler; HTTP has no such step)."""
        handles = client.__dict__.setdefault("bench_handles", {})
        if uid not in handles:
            handles[uid] = client.get_model(uid)
        return handles[uid]

    def embed(self, client) -> None:
        self.handle(client, "emb").create_embedding(SENTENCE)

    def stream(self, client, uid: str, tokens: int) -> int:
        chunks = list(self.handle(client, uid).generate(PROMPT, {"max_tokens": tokens, "temperature": 0,
                                                                 "stream": True}))
        return chunks[-1]["usage"]["completion_tokens"]

    def launch(self, client, **kwargs) -> str:
        return client.launch_model(**kwargs)

    def terminate(self, client, uid: str) -> None:
        client.terminate_model(uid)


class HttpSession:
    """A keep-alive HTTP/1.1 connection with the standard library's http.client: the leanest Python client, so
    that the load generator's own CPU (on the same 2 cores) costs the HTTP path as little as the ZMQ client
    costs its path (requests spends ~0.5 ms of CPU per request)."""

    def __init__(self, url: str, api_key: str):
        import http.client

        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    def request(self, method: str, path: str, body: dict | None = None):
        self.conn.request(method, path, json.dumps(body) if body is not None else None, self.headers)
        response = self.conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {response.read()[:200]!r}")
        return response


class HttpPath:
    name = "http"

    def __init__(self, mesh, api_key: str):
        self.url = mesh.gateway_url
        self.api_key = api_key

    def session(self) -> HttpSession:
        return HttpSession(self.url, self.api_key)

    def embed(self, s: HttpSession) -> None:
        json.loads(s.request("POST", "/v1/embeddings", {"model": "emb", "input": SENTENCE}).read())

    def stream(self, s: HttpSession, uid: str, tokens: int) -> int:
        body = {"model": uid, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        usage = 0
        response = s.request("POST", "/v1/completions", body)
        for line in response:  # server-sent events, a line at a time
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
        return usage

    def launch(self, s: HttpSession, **kwargs) -> str:
        return json.loads(s.request("POST", "/v1/models", kwargs).read())["model_uid"]

    def terminate(self, s: HttpSession, uid: str) -> None:
        s.request("DELETE", f"/v1/models/{uid}").read()


def together(n: int, warm, work) -> tuple[list, float]:
    """warm(i) then work(i) in n threads; the clock runs from when all are warm (a zinfer Client has a socket per
    thread: a thread's first call pays its connection and CURVE handshake, which must not be timed)."""
    results: list = [None] * n
    errors: list = []
    barrier = threading.Barrier(n + 1)

    def run(i):
        try:
            warm(i)
        except Exception as exc:  # a benchmark that fails must say so
            errors.append(exc)
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, time.perf_counter() - start


def latencies(path, n: int) -> list[float]:
    s = path.session()
    path.embed(s)
    out = []
    for _ in range(n):
        start = time.perf_counter()
        path.embed(s)
        out.append(time.perf_counter() - start)
    return out


def crowd_rate(path, clients: int, seconds: float) -> float:
    sessions = [path.session() for _ in range(clients)]
    deadline = []

    def loop(i):
        if not deadline:
            deadline.append(time.perf_counter() + seconds)
        n = 0
        while time.perf_counter() < deadline[0]:
            path.embed(sessions[i])
            n += 1
        return n

    counts, elapsed = together(clients, lambda i: path.embed(sessions[i]), loop)
    return sum(counts) / elapsed


def stream_rate(path, uid: str, streams: int, tokens: int = 128, repeat: int = 1) -> float:
    """Tokens/s of `streams` concurrent streams of `tokens` each, every stream repeated `repeat` times in a row
    (one 128-token llama.cpp stream of the tiny model lasts ~6 ms: one alone is too short a sample)."""
    sessions = [path.session() for _ in range(streams)]
    counts, elapsed = together(streams, lambda i: path.stream(sessions[i], uid, 8),
                               lambda i: sum(path.stream(sessions[i], uid, tokens) for _ in range(repeat)))
    return sum(counts) / elapsed


def best_of(rounds: int, paths, measure, better=max) -> dict[str, float]:
    """Alternate the paths, `rounds` times each; the better value of each."""
    seen: dict[str, list[float]] = {p.name: [] for p in paths}
    for _ in range(rounds):
        for path in paths:
            seen[path.name].append(measure(path))
    return {name: better(values) for name, values in seen.items()}


def start_to_ready(root: Path) -> float:
    """`zinfer up` on a fresh home and endpoint, until the gateway's /ready answers ready."""
    port = free_port()
    env = dict(os.environ, ZINFER_HOME=str(root / "up-home"), ZINFER_ENDPOINT=f"tcp://127.0.0.1:{free_port()}",
               ZINFER_GATEWAY_PORT=str(port))
    start = time.perf_counter()
    up = subprocess.Popen([sys.executable, "-m", "zinfer", "up"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while time.perf_counter() - start < 120:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ready", timeout=1).json().get("ready"):
                    return time.perf_counter() - start
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError("zinfer up did not become ready in 120 s")
    finally:
        os.killpg(up.pid, 2)
        up.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5, help="length of each 64-client round")
    ap.add_argument("--skip-start", action="store_true", help="skip the start-to-ready row")
    args = ap.parse_args()
    models = tiny_models()
    result: dict = {}
    if not args.skip_start:
        result["start_to_ready_s"] = round(start_to_ready(Path(tempfile.mkdtemp(prefix="zinfer-bench-up-"))), 2)
    mesh = start_mesh()
    try:
        mesh.start_gateway()
        c = mesh.client
        c.register_model("LLM", llm_definition(models, "bench-llm"))
        c.register_model("embedding", embedding_definition(models, "bench-minilm"))
        c.launch_model(model_name="bench-minilm", model_type="embedding", model_uid="emb")
        c.launch_model(model_name="bench-llm", model_format="pytorch", model_uid="hf")
        c.launch_model(model_name="bench-llm", model_format="ggufv2", quantization="F32", model_uid="gg")
        paths = [ZmqPath(mesh), HttpPath(mesh, keys.api_key_of(keys.read_key_file(mesh.admin_key)))]

        launches = {}
        for kind, kwargs in (("embedding", {"model_name": "bench-minilm", "model_type": "embedding"}),
                             ("transformers", {"model_name": "bench-llm", "model_format": "pytorch"}),
                             ("llama.cpp", {"model_name": "bench-llm", "model_format": "ggufv2"})):
            def launch_s(path, kwargs=kwargs):
                s = path.session()
                start = time.perf_counter()
                uid = path.launch(s, model_uid=f"launch-{path.name}", **kwargs)
                took = time.perf_counter() - start
                path.terminate(s, uid)
                return took

            launches[kind] = best_of(2, paths, launch_s, better=min)
        result["launch_s"] = {k: {n: round(v, 3) for n, v in d.items()} for k, d in launches.items()}

        lat = {p.name: [] for p in paths}
        for _ in range(3):
            for path in paths:
                lat[path.name] += latencies(path, 150)
        result["embed_1"] = {n: {"p50_ms": round(statistics.median(v) * 1e3, 2),
                                 "p99_ms": round(statistics.quantiles(v, n=100)[98] * 1e3, 2)}
                             for n, v in lat.items()}
        result["embed_64_per_s"] = {n: round(v) for n, v in best_of(2, paths, lambda p: crowd_rate(
            p, 64, args.seconds)).items()}
        for uid, engine in (("hf", "transformers"), ("gg", "llama.cpp")):
            for streams in (1, 16):
                rates = best_of(2, paths, lambda p, uid=uid, streams=streams: stream_rate(
                    p, uid, streams, repeat=20 if streams == 1 else 2))
                result[f"generate_{engine}_{streams}_tok_s"] = {n: round(v) for n, v in rates.items()}
    finally:
        mesh.stop()

    e = result["embed_1"]
    checks = {
        "embed_p50_over_zmq_ms": round(e["http"]["p50_ms"] - e["zmq"]["p50_ms"], 2),
        "embed_64_ratio": round(result["embed_64_per_s"]["http"] / result["embed_64_per_s"]["zmq"], 3),
        "sse_1_stream_ratio_transformers": round(result["generate_transformers_1_tok_s"]["http"]
                                                 / result["generate_transformers_1_tok_s"]["zmq"], 3),
        "sse_1_stream_ratio_llama": round(result["generate_llama.cpp_1_tok_s"]["http"]
                                          / result["generate_llama.cpp_1_tok_s"]["zmq"], 3),
    }
    result["checks"] = checks
    if "start_to_ready_s" in result:
        print(f"start to ready (zinfer up, gateway /ready): {result['start_to_ready_s']} s")
    for kind, d in result["launch_s"].items():
        print(f"launch {kind:13}: zmq {d['zmq']:.3f} s   http {d['http']:.3f} s")
    print(f"embed 1 sentence, 1 client: zmq p50 {e['zmq']['p50_ms']} ms p99 {e['zmq']['p99_ms']} ms   "
          f"http p50 {e['http']['p50_ms']} ms p99 {e['http']['p99_ms']} ms   (+{checks['embed_p50_over_zmq_ms']} ms; "
          "target <= +1.5 ms)")
    r = result["embed_64_per_s"]
    print(f"embed 64 clients: zmq {r['zmq']}/s   http {r['http']}/s   ratio {checks['embed_64_ratio']} "
          "(target >= 0.8)")
    for key in [k for k in result if k.startswith("generate_")]:
        print(f"{key}: zmq {result[key]['zmq']:,}   http {result[key]['http']:,}   "
              f"ratio {result[key]['http'] / result[key]['zmq']:.3f}")
    print(f"one SSE stream vs one ZMQ stream: transformers {checks['sse_1_stream_ratio_transformers']}, "
          f"llama.cpp {checks['sse_1_stream_ratio_llama']} (target >= 0.9)")
    record("http", result)


if __name__ == "__main__":
    main()

"""Bus benchmark: a no-op round trip client -> broker -> service -> client, against a direct DEALER<->ROUTER
pair measured in the same run. Prints p50/p99 latency, pipelined requests/s and the ratios.

    .venv/bin/python bench/bus.py [--n 5000] [--pipelined 50000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared import protocol as p  # noqa: E402
from shared.client import Client  # noqa: E402
from tests.mesh import Mesh, free_port  # noqa: E402

WINDOW = 200  # requests in flight in the pipelined runs


def direct_server(endpoint: str, ready) -> None:
    """The baseline: a ROUTER that decodes each request and answers Pong, no broker in between."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    ready.set()
    while True:
        frames = sock.recv_multipart()
        if frames[-1] == b"stop":
            break
        # same work as a service: decode the request, encode the reply
        msg = p.decode_request(frames[-1])
        sock.send_multipart([frames[0], frames[1], p.encode(p.Pong(payload=msg.payload))])
    sock.close(linger=0)
    ctx.term()


def direct_socket(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def direct_round_trips(sock: zmq.Socket, n: int) -> list[float]:
    body = p.encode(p.Ping())
    times = []
    for i in range(n):
        t = time.perf_counter()
        sock.send_multipart([i.to_bytes(8, "big"), body])
        sock.recv_multipart()
        times.append(time.perf_counter() - t)
    return times


def brokered_round_trips(client: Client, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        client.call("registry", p.Ping())
        times.append(time.perf_counter() - t)
    return times


def pipelined(send, recv, total: int) -> float:
    start = time.perf_counter()
    sent = got = 0
    while got < total:
        while sent < total and sent - got < WINDOW:
            send(sent)
            sent += 1
        recv()
        got += 1
    return total / (time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000, help="round trips for latency (x10 for throughput)")
    args = ap.parse_args()

    direct_ep = f"tcp://127.0.0.1:{free_port()}"
    ready = mp.Event()
    server = mp.Process(target=direct_server, args=(direct_ep, ready), daemon=True)
    server.start()
    ready.wait(10)
    dsock = direct_socket(direct_ep)
    body = p.encode(p.Ping())

    tmp = Path(tempfile.mkdtemp(prefix="zinfer-bench-"))
    mesh = Mesh(tmp / "home", tmp, heartbeat=1.0)
    try:
        mesh.start_broker()
        mesh.start("registry", "registry")
        mesh.wait_services({"registry"})
        client = mesh.client
        bsock = client._socket()
        direct_round_trips(dsock, 300), brokered_round_trips(client, 300)  # warm up
        d_times, b_times = [], []
        rounds = 10
        for _ in range(rounds):  # interleaved, so drift on the machine hits both alike
            d_times += direct_round_trips(dsock, args.n // rounds)
            b_times += brokered_round_trips(client, args.n // rounds)
        d_rps = pipelined(lambda i: dsock.send_multipart([i.to_bytes(8, "big"), body]), dsock.recv_multipart,
                          args.n * 10)
        b_rps = pipelined(lambda i: bsock.send_multipart(p.client_request(b"registry", i.to_bytes(8, "big"),
                                                                          body)),
                          bsock.recv_multipart, args.n * 10)
    finally:
        mesh.stop()
        dsock.send_multipart([b"x", b"stop"])
        server.join(5)

    result = {
        "bench": "bus", "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "direct_p50_us": round(pct(d_times, 50), 1), "direct_p99_us": round(pct(d_times, 99), 1),
        "brokered_p50_us": round(pct(b_times, 50), 1), "brokered_p99_us": round(pct(b_times, 99), 1),
        "direct_rps": round(d_rps), "brokered_rps": round(b_rps),
    }
    result["p50_ratio"] = round(result["brokered_p50_us"] / result["direct_p50_us"], 2)
    result["rps_ratio"] = round(result["brokered_rps"] / result["direct_rps"], 3)
    print(f"direct   DEALER<->ROUTER : p50 {result['direct_p50_us']:7.1f} us  p99 {result['direct_p99_us']:7.1f} us"
          f"  pipelined {result['direct_rps']:>8,} req/s")
    print(f"brokered client->broker->registry: p50 {result['brokered_p50_us']:7.1f} us  "
          f"p99 {result['brokered_p99_us']:7.1f} us  pipelined {result['brokered_rps']:>8,} req/s")
    print(f"ratio: p50 {result['p50_ratio']}x direct (target <= 2.5x); throughput {result['brokered_rps']:,} req/s "
          f"(target >= 30,000), {result['rps_ratio']}x direct")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    with open(out / "bus.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

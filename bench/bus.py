"""Bus benchmark: a no-op round trip client -> broker -> service -> client (CURVE on both hops, as zinfer
always runs), against a plaintext direct DEALER<->ROUTER pair measured in the same run; a direct pair with
CURVE is shown too, for what the encryption alone costs. Prints p50/p99 latency, pipelined requests/s and the
ratios.

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

from tests.mesh import Mesh, free_port  # noqa: E402
from zinfer.shared import protocol as p  # noqa: E402
from zinfer.shared import wire  # noqa: E402
from zinfer.shared.client import Client  # noqa: E402

WINDOW = 200  # requests in flight in the pipelined runs


def direct_server(endpoint: str, ready, server_secret: bytes | None = None) -> None:
    """The baseline: a ROUTER that decodes each request and answers Pong, no broker in between (plaintext, or
    CURVE with this secret key: no ZAP handler, so any client key is taken)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    if server_secret:
        sock.curve_server = True
        sock.curve_secretkey = server_secret
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


def direct_socket(endpoint: str, server_public: bytes | None = None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if server_public:
        sock.curve_serverkey = server_public
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
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

    servers, dsocks = [], {}
    server_public, server_secret = zmq.curve_keypair()
    for name, secret, public in (("direct", None, None), ("direct_curve", server_secret, server_public)):
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        ready = mp.Event()
        server = mp.Process(target=direct_server, args=(endpoint, ready, secret), daemon=True)
        server.start()
        ready.wait(10)
        servers.append(server)
        dsocks[name] = direct_socket(endpoint, public)
    body = p.encode(p.Ping())

    tmp = Path(tempfile.mkdtemp(prefix="zinfer-bench-"))
    mesh = Mesh(tmp / "home", tmp, heartbeat=1.0)
    times: dict[str, list[float]] = {"direct": [], "direct_curve": [], "brokered": []}
    rps: dict[str, float] = {}
    try:
        mesh.start_broker()
        mesh.start("registry", "registry")
        mesh.wait_services({"registry"})
        client = mesh.client
        bsock = client._socket()
        for sock in dsocks.values():
            direct_round_trips(sock, 300)  # warm up
        brokered_round_trips(client, 300)
        rounds = 10
        for _ in range(rounds):  # interleaved, so drift on the machine hits all alike
            for name, sock in dsocks.items():
                times[name] += direct_round_trips(sock, args.n // rounds)
            times["brokered"] += brokered_round_trips(client, args.n // rounds)
        for name, sock in dsocks.items():
            rps[name] = pipelined(lambda i, s=sock: s.send_multipart([i.to_bytes(8, "big"), body]),
                                  sock.recv_multipart, args.n * 10)
        rps["brokered"] = pipelined(
            lambda i: bsock.send_multipart(wire.client_request(b"registry", i.to_bytes(8, "big"), body)),
            bsock.recv_multipart, args.n * 10)
    finally:
        mesh.stop()
        for sock in dsocks.values():
            sock.send_multipart([b"x", b"stop"])
        for server in servers:
            server.join(5)

    result = {"bench": "bus", "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "curve": True}
    for name in times:
        result[f"{name}_p50_us"] = round(pct(times[name], 50), 1)
        result[f"{name}_p99_us"] = round(pct(times[name], 99), 1)
        result[f"{name}_rps"] = round(rps[name])
    result["p50_ratio"] = round(result["brokered_p50_us"] / result["direct_p50_us"], 2)
    result["rps_ratio"] = round(result["brokered_rps"] / result["direct_rps"], 3)
    labels = {"direct": "direct DEALER<->ROUTER, plaintext   ", "direct_curve": "direct DEALER<->ROUTER, CURVE       ",
              "brokered": "client->broker->registry, CURVE     "}
    for name, label in labels.items():
        print(f"{label}: p50 {result[name + '_p50_us']:7.1f} us  p99 {result[name + '_p99_us']:7.1f} us  "
              f"pipelined {result[name + '_rps']:>8,} req/s")
    print(f"ratio: brokered+CURVE p50 {result['p50_ratio']}x plaintext direct (target <= 2.8x); throughput "
          f"{result['brokered_rps']:,} req/s (target >= 25,000), {result['rps_ratio']}x direct")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    with open(out / "bus.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()

"""Fan-out benchmark: what one broker holds as the mesh grows. A real broker (CURVE, ZAP, production liveness:
1 s heartbeats x 3) with N simulated workers (DEALER sockets registered as services, each heartbeating and
answering Ping at once) spread over a few processes, and clients sending pipelined requests to random workers.

For each N (10, 100, 1,000 peers by default) it measures, in the same run:
- idle: the broker's CPU share when N peers only heartbeat;
- requests: replies/s and the broker's CPU time per request (request in, reply out);
- streams: chunks/s and broker CPU per chunk, each request answered by 20 PARTIAL chunks and a REPLY (what a
  streaming generation costs the broker);
and prints each against the N=10 run as the ratio (the baseline measured in the same run).

    .venv/bin/python bench/fanout.py [--peers 10 100 1000] [--seconds 5] [--clients 2] [--sims 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import record  # noqa: E402

from tests.mesh import Mesh  # noqa: E402
from zinfer.shared import (
    keys,  # noqa: E402
    wire,  # noqa: E402
)
from zinfer.shared import protocol as p  # noqa: E402

WINDOW = 64  # requests each client keeps in flight
CHUNKS = 20  # PARTIAL chunks per streamed request


def sim_workers(endpoint: str, home: str, names: list[str], interval: float, ready, stop) -> None:
    """Many workers in one process: each a DEALER registered under its name; Ping answered at once, or with
    CHUNKS partial replies when its payload is b"stream"."""
    ctx = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, len(names) + 16)
    key = keys.read_key_file(keys.keys_dir(Path(home)) / "service.key_secret")
    server = keys.broker_public_key(Path(home))
    socks = []
    for name in names:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100000)
        key.apply(sock, server)
        sock.connect(endpoint)
        sock.send_multipart(wire.peer_ready(name))
        socks.append(sock)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    pong = p.encode(p.Pong(payload=b"x"))
    ready.set()
    next_beat = time.monotonic() + interval
    while not stop.is_set():
        for sock, _ in poller.poll(100):
            for _ in range(100):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if frames[0] != wire.REQUEST:
                    continue
                client, req_id, body = frames[1], frames[2], frames[4]
                if body.endswith(b"stream"):  # msgpack of Ping(payload=b"stream") ends with the payload
                    for _ in range(CHUNKS):
                        sock.send_multipart(wire.peer_reply(client, req_id, pong, final=False))
                sock.send_multipart(wire.peer_reply(client, req_id, pong))
        if time.monotonic() >= next_beat:
            next_beat = time.monotonic() + interval
            for sock in socks:
                sock.send_multipart(wire.HEARTBEAT_FRAMES, zmq.NOBLOCK)
    for sock in socks:
        sock.send_multipart(wire.DISCONNECT_FRAMES, zmq.NOBLOCK)
        sock.close(linger=100)
    ctx.term()


def client_load(endpoint: str, home: str, targets: list[str], stream: bool, seconds: float, out) -> None:
    """Pipelined requests to random workers for `seconds`; puts (replies, messages received)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    keys.read_key_file(keys.client_key_path(Path(home), "admin")).apply(sock, keys.broker_public_key(Path(home)))
    sock.connect(endpoint)
    body = p.encode(p.Ping(payload=b"stream" if stream else b"x"))
    rng = random.Random(os.getpid())
    encoded = [t.encode() for t in targets]
    n = 0
    sent = replies = messages = 0
    end = time.monotonic() + seconds
    while sent < WINDOW:
        sock.send_multipart(wire.client_request(rng.choice(encoded), n.to_bytes(8, "big"), body))
        n += 1
        sent += 1
    while time.monotonic() < end:
        if not sock.poll(1000):
            continue
        frames = sock.recv_multipart()
        messages += 1
        if frames[0] == wire.REPLY:
            replies += 1
            sock.send_multipart(wire.client_request(rng.choice(encoded), n.to_bytes(8, "big"), body))
            n += 1
    out.put((replies, messages))
    sock.close(linger=0)
    ctx.term()


def sim_peers(mesh: Mesh, n: int) -> list[str]:
    return [x["service"] for x in mesh.client.broker_status(timeout=5)["peers"]
            if x["service"].startswith(f"worker/sim-{n}-")]


def broker_cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def run_size(mesh: Mesh, broker: psutil.Process, n: int, args) -> dict:
    names = [f"worker/sim-{n}-{i}" for i in range(n)]
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    sims, readies = [], []
    groups = [names[i::args.sims] for i in range(min(args.sims, n))]
    for group in groups:
        ready = ctx.Event()
        proc = ctx.Process(target=sim_workers, args=(mesh.endpoint, str(mesh.home), group, 1.0, ready, stop))
        proc.start()
        sims.append(proc)
        readies.append(ready)
    for ready in readies:
        ready.wait(120)
    deadline = time.monotonic() + 120
    while len(sim_peers(mesh, n)) < n:
        assert time.monotonic() < deadline, f"only some of {n} peers registered"
        time.sleep(0.2)
    result = {"peers": n}
    # Idle: heartbeats only.
    c0, t0 = broker_cpu(broker), time.monotonic()
    time.sleep(3)  # a measurement window, not a wait for a condition
    result["idle_cpu_pct"] = round(100 * (broker_cpu(broker) - c0) / (time.monotonic() - t0), 2)
    for mode in ("requests", "streams"):
        out = ctx.Queue()
        clients = [ctx.Process(target=client_load, args=(mesh.endpoint, str(mesh.home), names, mode == "streams",
                                                         args.seconds, out)) for _ in range(args.clients)]
        c0, t0 = broker_cpu(broker), time.monotonic()
        for c in clients:
            c.start()
        totals = [out.get(timeout=args.seconds + 120) for _ in clients]
        for c in clients:
            c.join()
        elapsed = time.monotonic() - t0
        cpu = broker_cpu(broker) - c0
        replies = sum(r for r, _ in totals)
        messages = sum(m for _, m in totals)
        result[mode] = {"per_s": round((messages if mode == "streams" else replies) / args.seconds),
                        "broker_cpu_us": round(1e6 * cpu / max(1, messages), 1),
                        "broker_cpu_pct": round(100 * cpu / elapsed, 1)}
    stop.set()
    for proc in sims:
        proc.join(30)
    deadline = time.monotonic() + 60
    while sim_peers(mesh, n):
        assert time.monotonic() < deadline, "simulated peers did not leave"
        time.sleep(0.2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--sims", type=int, default=2, help="processes the simulated workers are spread over")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="zinfer-fanout-"))
    mesh = Mesh(root / "home", root, heartbeat=1.0, liveness=3)
    try:
        mesh.start_broker()
        broker = psutil.Process(mesh.procs["broker"].pid)
        rows = [run_size(mesh, broker, n, args) for n in args.peers]
    finally:
        mesh.stop()
    base = rows[0]
    print(f"\none broker, CURVE; {args.clients} client processes x {WINDOW} in flight, {args.seconds:g} s per run")
    print(f"{'peers':>6} {'idle cpu':>9} {'req/s':>8} {'us/req':>7} {'x N=' + str(base['peers']):>8} "
          f"{'chunks/s':>9} {'us/chunk':>9} {'x N=' + str(base['peers']):>8}")
    for r in rows:
        print(f"{r['peers']:>6} {r['idle_cpu_pct']:>8.2f}% {r['requests']['per_s']:>8,} "
              f"{r['requests']['broker_cpu_us']:>7.1f} {r['requests']['per_s'] / base['requests']['per_s']:>7.2f}x "
              f"{r['streams']['per_s']:>9,} {r['streams']['broker_cpu_us']:>9.1f} "
              f"{r['streams']['per_s'] / base['streams']['per_s']:>7.2f}x")
    record("fanout", {"clients": args.clients, "window": WINDOW, "seconds": args.seconds, "rows": rows})


if __name__ == "__main__":
    main()

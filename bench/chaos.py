"""Chaos soak: clients keep working while mesh processes are SIGKILLed and restarted.

    .venv/bin/python bench/chaos.py [--minutes 10] [--clients 16] [--every 4] [--seed 1]

A mesh on loopback with production liveness (1 s heartbeats x 3): broker, registry, scheduler and two CPU
workers. N client threads run a mix of operations (register a persisted definition / unregister it, launch /
terminate an embedding model, generate, stream, embed, and heal the shared models when they are failed) while
a chaos thread SIGKILLs a random process (the broker included) every few seconds and restarts it. Every call
has a timeout. Bounded in time and count; loopback only.

At the end, with every process running again and settled, it checks what the mesh acknowledged:
- every persisted registration it acknowledged (and that was not unregistered later) is listed; every
  acknowledged unregister stays gone;
- every launch it acknowledged as ready is listed (ready, or failed with a reason) unless we terminated it;
  every acknowledged terminate stays terminated.
It prints operations by outcome: ok, typed errors by type, untyped errors (anything but shared.errors types),
hung (a call with no answer within its timeout), and acknowledged-then-lost.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from common import record, tiny_models

from tests.conftest import embedding_definition, llm_definition
from tests.mesh import Mesh
from zinfer.shared.errors import InternalError, NotFound, RequestTimeout, ZinferError

VICTIMS = ["broker", "registry", "scheduler", "worker/cpu:0", "worker/cpu:1"]


def generate(client, prompt: str, config: dict):
    result = client.get_model("gg").generate(prompt, config, timeout=30)
    return list(result) if config.get("stream") else result


def embed(client, texts: list[str]):
    return client.get_model("emb").create_embedding(texts, timeout=30)


class Soak:
    def __init__(self, mesh: Mesh, models, clients: int, seed: int):
        self.mesh = mesh
        self.models = models
        self.n_clients = clients
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()
        self.errors: Counter = Counter()
        self.errors_by_op: Counter = Counter()
        self.lost_at_unregister: list[str] = []  # acknowledged registrations the registry no longer knew
        self.untyped: list[str] = []
        self.hung: list[str] = []
        # What the mesh acknowledged: registrations that must be listed at the end, launches that must be listed
        # (any state), and names/uids that must be absent.
        self.registered: set[str] = set()
        self.unregistered: set[str] = set()
        self.launched: set[str] = set()
        self.terminated: set[str] = set()
        self.stop = threading.Event()

    # ------------------------------------------------------------------ bookkeeping

    def outcome(self, op: str, fn, *args, **kwargs) -> tuple[bool, object]:
        """Call fn(*args, **kwargs) and count how it ended: (True, its result) or (False, the exception)."""
        try:
            result = fn(*args, **kwargs)
        except RequestTimeout as exc:
            with self.lock:
                self.outcomes[(op, "hung")] += 1
                self.hung.append(f"{op}: {exc}")
            return False, exc
        except ZinferError as exc:
            with self.lock:
                self.outcomes[(op, "error")] += 1
                self.errors[type(exc).__name__] += 1
                self.errors_by_op[f"{op}:{type(exc).__name__}"] += 1
                if isinstance(exc, InternalError):
                    self.untyped.append(f"{op}: InternalError: {exc}")
            return False, exc
        except Exception as exc:  # anything else is a defect: an error without a type
            with self.lock:
                self.outcomes[(op, "untyped")] += 1
                self.untyped.append(f"{op}: {type(exc).__name__}: {exc}")
            return False, exc
        with self.lock:
            self.outcomes[(op, "ok")] += 1
        return True, result

    # ------------------------------------------------------------------ clients

    def client_loop(self, index: int) -> None:
        rng = random.Random(index)
        client = self.mesh.new_client(timeout=30)
        mine = {"registered": [], "launched": None, "index": index, "n": 0}  # this client's own names
        while not self.stop.is_set():
            mine["n"] += 1
            op = rng.choices(["generate", "stream", "embed", "register", "unregister", "launch", "terminate",
                              "heal"], weights=[5, 3, 5, 2, 1, 1, 1, 1])[0]
            if op == "generate":
                self.outcome(op, generate, client, "Once upon a time", {"max_tokens": 16, "temperature": 0})
            elif op == "stream":
                self.outcome(op, generate, client, "hello", {"max_tokens": 24, "temperature": 0, "stream": True})
            elif op == "embed":
                self.outcome(op, embed, client, [f"chaos {index} {mine['n']}", "the sea"])
            elif op == "heal":
                self.outcome(op, self.heal, client)
            elif op in ("register", "unregister"):
                self.registration_op(op, client, mine)
            else:
                self.launch_op(op, client, mine)
        client.close()

    def registration_op(self, op: str, client, mine: dict) -> None:
        """Register a model of this client's own, or unregister its oldest; the books say what was acknowledged."""
        if op == "register":
            name = f"chaos-{mine['index']}-{mine['n']}"
            if self.outcome(op, client.register_model, "LLM", llm_definition(self.models, name), persist=True,
                            timeout=30)[0]:
                with self.lock:
                    self.registered.add(name)
                mine["registered"].append(name)
            return
        if not mine["registered"]:
            return
        name = mine["registered"].pop(0)
        with self.lock:
            self.registered.discard(name)  # from here its fate is unknown until the answer
        ok, answer = self.outcome(op, client.unregister_model, "LLM", name, timeout=30)
        with self.lock:
            if ok:
                self.unregistered.add(name)
            elif isinstance(answer, NotFound):  # it was acknowledged, and now it is not there
                self.lost_at_unregister.append(name)

    def launch_op(self, op: str, client, mine: dict) -> None:
        """Launch this client's one instance, or terminate it."""
        if op == "launch" and mine["launched"] is None:
            uid = mine["launched"] = f"chaos-emb-{mine['index']}-{mine['n']}"
            if self.outcome(op, client.launch_model, model_name="custom-bge-base-en", model_type="embedding",
                            model_uid=uid, timeout=60)[0]:
                with self.lock:
                    self.launched.add(uid)
        elif op == "terminate" and mine["launched"] is not None:
            uid = mine["launched"]
            with self.lock:
                self.launched.discard(uid)
            ok, answer = self.outcome(op, client.terminate_model, uid, timeout=60)
            if ok:
                with self.lock:
                    self.terminated.add(uid)
            if ok or isinstance(answer, NotFound):  # gone (a launch that never took place is not there)
                mine["launched"] = None

    def heal(self, client) -> None:
        """Relaunch a shared model that has failed (its worker died): terminate it, launch it under its uid."""
        models = client.list_models(timeout=30)
        for uid, kwargs in (("gg", {"model_name": "custom-llama-2", "model_format": "ggufv2"}),
                            ("emb", {"model_name": "custom-bge-base-en", "model_type": "embedding"})):
            view = models.get(uid)
            if view is not None and view["state"] == "failed":
                client.terminate_model(uid, timeout=60)
                view = None
            if view is None:
                client.launch_model(model_uid=uid, replica=2, timeout=60, **kwargs)

    # ------------------------------------------------------------------ chaos

    def chaos_loop(self, every: float, deadline: float, started: float) -> None:
        """Kill and restart until the deadline. It runs on the main thread: the processes it starts ask to die
        with the thread that started them (PR_SET_PDEATHSIG fires when that thread ends)."""
        next_report = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(min(every * self.rng.uniform(0.5, 1.5), max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                break
            victim = self.rng.choice(VICTIMS)
            self.mesh.kill(victim)
            with self.lock:
                self.outcomes[("kill", victim)] += 1
            time.sleep(self.rng.uniform(0, 2))  # the outage
            self.restart(victim)
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + 5
                done = sum(v for (op, _kind), v in self.outcomes.items() if op != "kill")
                print(f"{time.monotonic() - started:6.0f}s  operations {done:,}  errors {dict(self.errors)}  "
                      f"untyped {len(self.untyped)}  hung {len(self.hung)}", flush=True)

    def restart(self, name: str) -> None:
        m = self.mesh
        if name == "broker":
            m.start_broker()
        elif name.startswith("worker/"):
            m.start_worker(name.removeprefix("worker/"))
        else:
            m.start(name, name)

    # ------------------------------------------------------------------ the check

    def verify(self) -> dict:
        m = self.mesh
        for name in VICTIMS:
            if m.procs[name].poll() is not None:
                self.restart(name)
        m.wait_services({"registry", "scheduler", "worker/cpu:0", "worker/cpu:1"}, timeout=60)
        m.wait(lambda: len(m.client.scheduler_status()["workers"]) == 2 or None, timeout=60)
        listed = {r["model_name"] for r in m.client.list_model_registrations("LLM")}
        launched = set(m.client.list_models())
        return {
            "lost_registrations": sorted((self.registered - listed) | set(self.lost_at_unregister)),
            "resurrected_registrations": sorted(self.unregistered & listed),
            "lost_launches": sorted(self.launched - launched),
            "resurrected_launches": sorted(self.terminated & launched),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--every", type=float, default=4, help="seconds between kills (randomised 0.5-1.5x)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    models = tiny_models()
    root = Path(tempfile.mkdtemp(prefix="zinfer-chaos-"))
    mesh = Mesh(root / "home", root, heartbeat=1.0, liveness=3).start_all(workers=("cpu:0", "cpu:1"))
    try:
        for proc in mesh.procs.values():  # the soak kills and restarts them: no process is "expected" to live
            proc.expected_alive = False
        c = mesh.client
        c.register_model("LLM", llm_definition(models), persist=True)
        c.register_model("embedding", embedding_definition(models), persist=True)
        c.launch_model(model_name="custom-llama-2", model_format="ggufv2", model_uid="gg", replica=2)
        c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="emb", replica=2)
        soak = Soak(mesh, models, args.clients, args.seed)
        threads = [threading.Thread(target=soak.client_loop, args=(i,), daemon=True) for i in range(args.clients)]
        start = time.monotonic()
        for t in threads:
            t.start()
        soak.chaos_loop(args.every, start + args.minutes * 60, start)
        soak.stop.set()
        stuck = 0
        for t in threads:
            t.join(timeout=120)  # every call has a timeout: a thread still here is a hung client
            stuck += t.is_alive()
        check = soak.verify()
    finally:
        mesh.stop()
    kills = {kind: v for (op, kind), v in soak.outcomes.items() if op == "kill"}
    ops = Counter()
    for (op, kind), v in soak.outcomes.items():
        if op != "kill":
            ops[kind] += v
    lost = sum(len(v) for v in check.values())
    print(f"\n{args.minutes:g} min, {args.clients} clients, kills {sum(kills.values())} {kills}")
    print(f"operations: {sum(ops.values()):,} ({dict(ops)})")
    print(f"typed errors by type: {dict(soak.errors)}")
    print(f"untyped errors: {len(soak.untyped)} {soak.untyped[:5]}")
    print(f"hung calls: {len(soak.hung)} {soak.hung[:5]}; hung client threads: {stuck}")
    print(f"acknowledged and lost (or resurrected): {lost} {check}")
    record("chaos", {"minutes": args.minutes, "clients": args.clients, "kills": kills, "operations": dict(ops),
                     "by_op": {f"{op}:{kind}": v for (op, kind), v in soak.outcomes.items()},
                     "typed_errors": dict(soak.errors), "errors_by_op": dict(soak.errors_by_op),
                     "untyped": len(soak.untyped), "hung": len(soak.hung), "stuck_threads": stuck, "lost": lost,
                     "check": check})


if __name__ == "__main__":
    main()

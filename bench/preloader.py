"""What the host's preloader saves: a worker's fork server forked from it (its imports done once for the host)
against the worker's own fork server, which imports the engines when the worker starts. Both in the same run.

- `first launch`: a new mesh (broker, registry, scheduler, one CPU worker), then a launch of the tiny Llama on
  llama.cpp and one greedy request: seconds from the mesh's start to the answer.
- `worker restart`: that worker SIGKILLed and started again; seconds until its instance is restored (ready) and
  answers.
- `host CPU`: the CPU seconds the worker's fork server spent starting (its imports), read from /proc.

The preloader is started (and its imports made) once before the timed rounds, as `zinfer up` does when the host
starts; the worker's own fork server is measured the way every worker started before the preloader.

    .venv/bin/python bench/preloader.py [--rounds 3]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import psutil
from common import arguments, record, tiny_models

from tests.conftest import llm_definition
from tests.mesh import Mesh, session_preloader

GREEDY = {"max_tokens": 8, "temperature": 0}


def answered(m: Mesh) -> None:
    m.wait(lambda: m.client.describe_model("gg")["state"] == "ready" or None, timeout=120)
    assert m.client.get_model("gg").generate("Once upon a time", GREEDY)["choices"][0]["text"]


def fork_server_cpu(m: Mesh) -> float:
    instance = psutil.Process(m.client.describe_model("gg")["pids"][0])
    times = instance.parent().cpu_times()
    return times.user + times.system


def one_round(models, preloader: bool) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="zinfer-bench-"))
    start = time.perf_counter()
    m = Mesh(root / "home", root, heartbeat=1.0, preloader=preloader).start_all()
    try:
        m.client.register_model("LLM", llm_definition(models))
        m.client.launch_model(model_name="custom-llama-2", model_format="ggufv2", quantization="F32",
                              model_uid="gg")
        answered(m)
        first = time.perf_counter() - start
        cpu = fork_server_cpu(m)
        m.kill("worker/cpu")
        m.wait(lambda: m.client.describe_model("gg")["state"] != "ready" or None, timeout=60)
        start = time.perf_counter()
        m.start_worker("cpu")
        answered(m)
        return {"first": first, "restart": time.perf_counter() - start, "cpu": cpu}
    finally:
        m.stop()


def main() -> None:
    args = arguments(3)
    models = tiny_models()
    session_preloader(Mesh(Path(tempfile.mkdtemp()) / "home", Path(tempfile.mkdtemp())).env)
    one_round(models, True)  # the preloader's imports done, as at the host's start
    rows = {False: [], True: []}
    for _ in range(args.rounds):
        for preloader in (False, True):
            rows[preloader].append(one_round(models, preloader))
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("first", "restart", "cpu")} for k, v in rows.items()}
    print(f"{'':<28}{'own fork server':>16}{'from the preloader':>20}{'ratio':>8}")
    for field, label in (("first", "first launch answered, s"), ("restart", "worker restart answered, s"),
                         ("cpu", "fork server CPU, s")):
        own, pre = med[False][field], med[True][field]
        print(f"{label:<28}{own:>16.2f}{pre:>20.2f}{own / max(pre, 1e-9):>7.1f}x")
    record("preloader", {"rounds": args.rounds, "median": {("preloader" if k else "own"): v for k, v in med.items()}})


if __name__ == "__main__":
    main()

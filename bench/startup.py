"""How soon a process of the mesh listens: `zinfer broker` as the mesh starts it (cli/main.py's services-only app)
against the same command through the whole CLI app (every command group, the client, numpy), interleaved in one
run. The broker is the process whose own start is smallest, so the CLI's share shows most there.

    .venv/bin/python bench/startup.py [--rounds 10]
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import arguments, record

from zinfer.shared import keys

WHOLE_APP = "import sys; from zinfer.cli.main import build; build()()"  # `python -c` leaves the args in sys.argv


def listening_after(cmd: list[str], socket: Path, env: dict) -> tuple[float, float]:
    """Seconds from exec until the broker's ipc socket exists, and the CPU seconds the process used by its exit."""
    socket.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not socket.exists():
        if proc.poll() is not None or time.perf_counter() - start > 30:
            raise RuntimeError(f"{' '.join(cmd)} did not listen (exit {proc.poll()})")
        time.sleep(0.002)
    wall = time.perf_counter() - start
    proc.terminate()
    proc.wait(15)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    args = arguments(10)
    home = Path(tempfile.mkdtemp(prefix="zinfer-bench-startup-"))
    keys.init_keys(home)
    socket = home / "broker.sock"
    env = dict(os.environ, ZINFER_HOME=str(home), ZINFER_LOG_STDERR="0")
    line = ["broker", "-e", f"ipc://{socket}"]
    ways = {"services app": [sys.executable, "-m", "zinfer", *line],
            "whole app": [sys.executable, "-c", WHOLE_APP, *line]}
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(args.rounds):  # interleaved, so that drift of the machine falls on both alike
        for name, cmd in ways.items():
            got[name].append(listening_after(cmd, socket, env))
    result = {}
    for name, rows in got.items():
        wall, cpu = np.median([r[0] for r in rows]), np.median([r[1] for r in rows])
        result[name] = {"p50_s_listening": round(float(wall), 3), "p50_cpu_s": round(float(cpu), 3)}
        print(f"{name}: broker listening after {wall:.3f} s (p50 of {args.rounds}), {cpu:.3f} s of CPU")
    ratio = result["whole app"]["p50_s_listening"] / result["services app"]["p50_s_listening"]
    print(f"services app / whole app: {ratio:.2f}x sooner")
    record("startup", {**result, "ratio": round(ratio, 3)})


if __name__ == "__main__":
    main()

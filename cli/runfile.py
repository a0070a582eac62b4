"""`<home>/run/up.json`: which `zinfer up` runs a mesh from this home, and its children (for `zinfer down`).

A pid alone can be reused by an unrelated process after a crash; each pid is stored with its process's start
time, and only a process with both is taken to be ours.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import psutil

from zinfer.shared.atomic import write_atomic


class Child(msgspec.Struct, kw_only=True):
    args: list[str]
    pid: int
    started: float  # the process's create_time


class UpRecord(msgspec.Struct, kw_only=True):
    pid: int
    started: float
    endpoint: str
    gateway: str = ""
    children: list[Child] = []


def run_file(home: Path) -> Path:
    return home / "run" / "up.json"


def started_at(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def alive(pid: int, started: float) -> bool:
    """Whether the process `pid` that started at `started` still runs (not a later process given its pid)."""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def read(home: Path) -> UpRecord | None:
    """The record, or None when there is none (or it cannot be read: a crash mid-write cannot leave one, see
    write())."""
    try:
        return msgspec.json.decode(run_file(home).read_bytes(), type=UpRecord)
    except (OSError, msgspec.DecodeError):
        return None


def write(home: Path, record: UpRecord) -> None:
    write_atomic(run_file(home), msgspec.json.encode(record))


def remove(home: Path, pid: int | None = None) -> None:
    """Delete the record (only if it is `pid`'s, when given: a later `up` may have written its own)."""
    record = read(home)
    if pid is not None and record is not None and record.pid != pid:
        return
    run_file(home).unlink(missing_ok=True)


def wait_gone(procs: list[tuple[int, float]], timeout: float) -> list[tuple[int, float]]:
    """Poll until none of (pid, start time) runs, or the timeout; returns those still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = [(pid, started) for pid, started in procs if alive(pid, started)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)

"""Operator commands: `zinfer down` (stop what `zinfer up` started) and `zinfer logs` (read the services' logs)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from zinfer.cli import runfile
from zinfer.cli.common import command, console, fail
from zinfer.shared.config import load_settings
from zinfer.shared.logs import console_renderers, log_folder, log_name

Home = Annotated[str | None, typer.Option("--home", help="Data folder (default ~/.zinfer or ZINFER_HOME).")]


def down(
    home: Home = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for a clean stop before "
                                           "killing what is left.")] = 30.0,
) -> None:
    """Stop the mesh that `zinfer up` started from this home (its pid file: <home>/run/up.json)."""
    home_path = load_settings(home=home).home_path
    record = runfile.read(home_path)
    if record is None:
        typer.echo(f"no mesh started by `zinfer up` is running from {home_path}")
        return
    procs = [(c.pid, c.started) for c in record.children]
    if runfile.alive(record.pid, record.started):
        os.kill(record.pid, signal.SIGTERM)  # `up` stops its children in order, then removes the pid file
        if runfile.wait_gone([(record.pid, record.started)], timeout):
            os.kill(record.pid, signal.SIGKILL)
            runfile.wait_gone([(record.pid, record.started)], 5)
        stopped = f"stopped the mesh at {record.endpoint} (zinfer up, pid {record.pid})"
    else:
        stopped = f"the `zinfer up` of pid {record.pid} was gone; removed its pid file"
    left = runfile.wait_gone(procs, 5 if runfile.alive(record.pid, record.started) else 1)
    for pid, _started in left:  # children that outlived their `up` (it was killed): stop them too
        os.kill(pid, signal.SIGTERM)
    left = runfile.wait_gone(left, 10)
    for pid, _started in left:
        os.kill(pid, signal.SIGKILL)
    if runfile.wait_gone(left, 5):
        fail(f"processes {[pid for pid, _ in left]} did not stop")
    runfile.remove(home_path, record.pid)
    typer.echo(stopped)


# ------------------------------------------------------------------ logs


def _files(folder: Path, service: str | None) -> list[Path]:
    found = sorted(folder.glob("*.log")) if folder.is_dir() else []
    if service is None:
        return found
    stem = log_name(service)
    exact = [f for f in found if f.stem == stem]
    if exact:
        return exact
    prefixed = [f for f in found if f.stem.startswith(stem + "-")]  # "worker": every worker-*.log
    if prefixed:
        return prefixed
    names = ", ".join(f.stem for f in found) or "none yet"
    fail(f"no log for service {service!r} in {folder} (services with logs: {names})")
    return []


def _last_lines(path: Path, n: int) -> tuple[list[str], int, int]:
    """The last n complete lines of a file, reading back from its end in blocks (logs can be large), with the
    file's inode and the offset just past the last complete line: following goes on from exactly there."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        data, pos = b"", st.st_size
        while pos > 0 and data.count(b"\n") <= max(n, 0):
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    cut = data.rfind(b"\n") + 1  # a line still being written is left for the follower
    lines = data[:cut].splitlines()[-n:] if n > 0 else []
    return [line.decode("utf-8", "replace") for line in lines if line.strip()], st.st_ino, pos + cut


class _Printer:
    """JSON lines as they are, or rendered for a person (on a terminal, unless --json)."""

    def __init__(self, raw: bool):
        self.raw = raw
        self.render = None if raw else console_renderers(colors=console.is_terminal)

    def __call__(self, line: str) -> None:
        if self.raw:
            sys.stdout.write(line + "\n")
            return
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            sys.stdout.write(line + "\n")
            return
        if isinstance(event.get("exception"), list):  # rendered as dicts in the file: back to a traceback
            event["exception"] = _traceback_text(event["exception"])
        for processor in self.render:
            event = processor(None, event.get("level", "info"), event)
        sys.stdout.write(event + "\n")


def _traceback_text(stack: list) -> str:
    """structlog's dict traceback (ExceptionDictTransformer) as the text Python would print."""
    out = []
    for exc in stack:
        if not isinstance(exc, dict):
            continue
        out.append("Traceback (most recent call last):")
        for frame in exc.get("frames", []):
            out.append(f'  File "{frame.get("filename")}", line {frame.get("lineno")}, in {frame.get("name")}')
        out.append(f"{exc.get('exc_type')}: {exc.get('exc_value')}")
    return "\n".join(out)


def _timestamp(line: str) -> str:
    try:
        return str(json.loads(line).get("timestamp", ""))
    except (ValueError, AttributeError):
        return ""


def logs(
    service: Annotated[str | None, typer.Argument(
        help="registry, scheduler, broker, gateway, worker/cpu, ... or worker (all workers); default: all.")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines (Ctrl-C stops).")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="How many of the last lines to show.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="The JSON lines as written (the default when not "
                                          "on a terminal).")] = False,
    home: Home = None,
) -> None:
    """Show the services' logs (<home>/logs/<service>.log), merged by time."""
    folder = log_folder(load_settings(home=home).home_path)
    files = _files(folder, service)
    if not files and not follow:
        typer.echo(f"no logs in {folder} yet", err=True)
        return
    show = _Printer(as_json or not console.is_terminal)
    recent, where = [], {}
    for f in files:
        got, inode, offset = _last_lines(f, lines)
        recent += got
        where[f] = (inode, offset)  # a line written after this read is the follower's to print
    recent.sort(key=_timestamp)  # ISO timestamps in UTC: text order is time order
    for line in recent[-lines:] if lines else []:
        show(line)
    sys.stdout.flush()
    if not follow:
        return
    # Follow: poll each file for growth; a file that was rotated (new inode, or shorter) is read from its start.
    try:
        while True:
            for f in _files(folder, None) if service is None else files:  # new services' files too
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                inode, offset = where.get(f, (st.st_ino, 0))
                if st.st_ino != inode or st.st_size < offset:
                    offset = 0
                if st.st_size > offset:
                    with open(f, "rb") as handle:
                        handle.seek(offset)
                        data = handle.read()
                    complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for its end
                    for line in complete.decode("utf-8", "replace").splitlines():
                        if line.strip():
                            show(line)
                    offset += len(complete)
                    sys.stdout.flush()
                where[f] = (st.st_ino, offset)
            time.sleep(0.25)
    except KeyboardInterrupt:
        return


def install(app: typer.Typer) -> None:
    command(app, down)
    command(app, logs)

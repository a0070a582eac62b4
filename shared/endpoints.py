"""Is a broker endpoint free? Who holds it? (`zinfer up` and the broker ask before binding.)

tcp: binding a plain socket with SO_REUSEADDR (as libzmq does) fails only when something listens there.
ipc: libzmq unlinks an existing socket file and binds anew, silently taking the path from a live broker;
so a path that accepts a connection is in use, one that refuses it is a stale file.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

import psutil


def _describe(pid: int | None) -> str:
    if not pid:
        return "another process"
    try:
        proc = psutil.Process(pid)
        cmd = " ".join(proc.cmdline()[:6]) or proc.name()
    except psutil.Error:
        return f"pid {pid}"
    return f"pid {pid} ({cmd})"


def _tcp_holder(host: str, port: int) -> str | None:
    address = "" if host in ("*", "0.0.0.0") else host
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
            return None
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return None  # an address we cannot bind at all: let the broker's bind report it
    return _describe(_listener("tcp", lambda c: c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port))


def _ipc_holder(path: str) -> str | None:
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return f"a file that is not a socket ({path})"
    except FileNotFoundError:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return None  # a stale socket file: nobody accepts there
    return _describe(_listener("unix", lambda c: c.laddr == path and c.pid))


def _listener(kind: str, match) -> int | None:
    """The pid of the first connection of this kind that matches (None: none, or we may not see it)."""
    try:
        return next((conn.pid for conn in psutil.net_connections(kind=kind) if match(conn)), None)
    except psutil.Error:
        return None


def endpoint_holder(endpoint: str) -> str | None:
    """A description of what already listens at `endpoint` ("pid 123 (python -m cli broker)"), or None."""
    if endpoint.startswith("ipc://"):
        return _ipc_holder(endpoint[len("ipc://"):])
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        if not port.isdigit() or int(port) == 0:
            return None
        return _tcp_holder(host.strip("[]"), int(port))
    return None

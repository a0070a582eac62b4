"""Faults, and what the mesh says and does through them (real processes on loopback)."""

from __future__ import annotations

import threading
import time

from shared import protocol as p
from shared.errors import Unavailable
from tests.mesh import Mesh
from tests.test_mesh import start_peer


def test_a_dead_broker_fails_pending_calls_with_unavailable_soon(tmp_path):
    m = Mesh(tmp_path / "home", tmp_path)
    try:
        m.start_broker()
        start_peer(m)
        m.wait_services({"testpeer"})
        client = m.new_client(timeout=30)
        result = {}

        def call():
            start = time.monotonic()
            try:
                client.call("testpeer", p.Ping(payload=b"sleep:20"))
            except Unavailable as exc:
                result.update(error=str(exc), after=time.monotonic() - start)

        t = threading.Thread(target=call)
        t.start()
        m.wait(lambda: m.client.broker_status()["pending"] >= 1 or None)
        m.kill("broker")
        t.join(timeout=10)
        assert "lost the connection to the broker" in result["error"] and result["after"] < 5
    finally:
        m.stop()


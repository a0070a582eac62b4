"""A test peer on the real service runtime: `python -m tests.peer ENDPOINT NAME`.

It answers Ping like every service does, and reads the payload as a command so bus tests can exercise the
broker: b"sleep:S" answers after S seconds, b"stream:N" streams N chunks (Pong payloads b"0", b"1", ...).
"""

from __future__ import annotations

import sys
import time

from zinfer.shared import protocol as p
from zinfer.shared.config import load_settings
from zinfer.shared.logs import configure_logging
from zinfer.shared.transport import ServiceRuntime


def ping(msg: p.Ping, ctx):
    cmd, _, arg = msg.payload.partition(b":")
    if cmd == b"sleep":
        time.sleep(float(arg))
        return p.Pong(payload=b"slept")
    if cmd == b"stream":
        return (p.Pong(payload=str(i).encode()) for i in range(int(arg)))
    return p.Pong(payload=msg.payload)


if __name__ == "__main__":
    endpoint, name = sys.argv[1], sys.argv[2]
    configure_logging(name)
    runtime = ServiceRuntime(name, load_settings(endpoint=endpoint), {p.Ping: ping})
    runtime.install_signal_handlers()
    runtime.serve()

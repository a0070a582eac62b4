"""The gateway's side of the bus: asyncio ZeroMQ connections to the broker, one per caller key.

The gateway acts on the bus as its caller and never more: each API key is the caller's own CURVE secret key
(`zinfer keys create` prints it), and the gateway opens one DEALER with exactly that keypair. The broker
authenticates it (an unknown or revoked key is refused at the handshake) and stamps its requests with its role.
Many requests share one connection, told apart by request id; the event loop hands each reply to its waiter.
Frames come from shared/protocol.py, as everywhere else.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import OrderedDict
from collections.abc import AsyncIterator

import zmq
from zmq.utils.monitor import parse_monitor_message

from zinfer.shared import keys, wire
from zinfer.shared import protocol as p
from zinfer.shared.buscore import (
    CONNECT_TIMEOUT,
    MONITOR_EVENTS,
    MonitorState,
    Requests,
    close_connection,
    read_reply,
    stream_step,
)
from zinfer.shared.config import Settings
from zinfer.shared.errors import RequestTimeout, Unavailable
from zinfer.shared.transport import send_frames

_ids = itertools.count()


class Connection:
    """One caller's DEALER to the broker, shared by all of that caller's requests. The event loop watches the
    socket's file descriptor (add_reader) and drains it with non-blocking receives: a reply resolves its waiter
    directly, without pyzmq's asyncio layer (one callback per wake-up, not a future per receive)."""

    def __init__(self, ctx: zmq.Context, settings: Settings, key: keys.KeyFile):
        self.settings = settings
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes)
        key.apply(self.sock)
        self.monitor = self.sock.get_monitor_socket(MONITOR_EVENTS, addr=f"inproc://zinfer-gateway-{os.getpid()}-"
                                                                  f"{next(_ids)}")
        self.waiters: dict[bytes, asyncio.Future | asyncio.Queue] = {}
        self.up = asyncio.Event()
        self.state = MonitorState(refused="the API key was refused: it is unknown or was revoked",
                                  mismatch="the secure handshake with the broker failed")
        self.requests = Requests(settings.max_message_bytes, settings.max_message_mb)
        self.sock.connect(settings.endpoint)
        self.loop.add_reader(self.sock.FD, self._readable)
        self.loop.add_reader(self.monitor.FD, self._monitor_readable)
        self._readable()
        self._monitor_readable()

    @property
    def failure(self) -> Exception | None:
        """Set when the handshake was refused: the key is bad."""
        return self.state.failure

    async def ready(self) -> None:
        if self.failure is not None:
            raise self.failure
        if not self.up.is_set():
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):  # not wait_for: see stream()
                    await self.up.wait()
            except TimeoutError:
                if self.failure is not None:
                    raise self.failure from None
                raise Unavailable(f"no zinfer broker answers at {self.settings.endpoint}") from None

    # ------------------------------------------------------------------ the socket's events

    def _readable(self) -> None:
        """Drain the socket (its FD is edge-triggered: read until nothing is left)."""
        sock = self.sock
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            if len(frames) < 3:
                continue
            waiter = self.waiters.get(frames[1].bytes)
            if waiter is None:
                continue
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait(frames)
            elif not waiter.done():
                waiter.set_result(frames)

    def _monitor_readable(self) -> None:
        while self.monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            kind = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))["event"]
            error = self.state.apply(kind)
            (self.up.set if self.state.up else self.up.clear)()
            if error is self.state.failure and error is not None:
                self._fail_all(error)
            elif error is not None:
                self._fail_all(Unavailable(f"lost the connection to the broker at {self.settings.endpoint}"))

    def _fail_all(self, error: Exception) -> None:
        for waiter in self.waiters.values():
            if isinstance(waiter, asyncio.Queue):
                waiter.put_nowait(error)
            elif not waiter.done():
                waiter.set_exception(error)

    # ------------------------------------------------------------------ requests

    def _send(self, target: str | bytes, msg: p.Msg, waiter: asyncio.Future | asyncio.Queue) -> bytes:
        req_id, frames = self.requests.frames(target, msg)
        self.waiters[req_id] = waiter
        try:
            send_frames(self.sock, frames, zmq.NOBLOCK)
        except zmq.Again:
            del self.waiters[req_id]
            raise Unavailable(f"the broker at {self.settings.endpoint} is not reachable") from None
        # A send can take the FD's edge for messages that were already waiting: look once more, soon.
        self.loop.call_soon(self._readable)
        return req_id

    def _cancel(self, req_id: bytes) -> None:
        self.waiters.pop(req_id, None)
        try:
            send_frames(self.sock, wire.client_cancel(req_id), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    @staticmethod
    def _decode(item) -> tuple[bytes, p.Msg, list]:
        if isinstance(item, Exception):
            raise item
        return read_reply(item)

    async def call(self, target: str | bytes, msg: p.Msg, timeout: float) -> tuple[p.Msg, list]:
        """One request, one reply (and its raw frames, e.g. an embedding's float32 buffer)."""
        await self.ready()
        future = self.loop.create_future()
        req_id = self._send(target, msg, future)
        timer = self.loop.call_later(timeout, _expire, future, f"no reply to {type(msg).__name__} within "
                                     f"{timeout:g}s")
        try:
            frames = await future
        except RequestTimeout:
            self._cancel(req_id)
            raise
        except asyncio.CancelledError:  # the HTTP client went away: stop the work it started
            self._cancel(req_id)
            raise
        finally:
            timer.cancel()
            self.waiters.pop(req_id, None)
        _cmd, reply, buffers = self._decode(frames)
        return reply, buffers

    async def stream(self, target: str, msg: p.Msg, timeout: float) -> AsyncIterator[p.Msg]:
        """A streamed reply, chunk by chunk; leaving early (or being cancelled) cancels the work on the server."""
        await self.ready()
        queue: asyncio.Queue = asyncio.Queue()
        req_id = self._send(target, msg, queue)
        done = False
        try:
            while True:
                if queue.empty():
                    # Not asyncio.wait_for: on Python 3.11 a cancel that lands while the next chunk is already in
                    # hand is swallowed (wait_for returns the chunk), so an HTTP client that went away left its
                    # generation running to max_tokens (CI: 8,000 of 8,000 tokens after a disconnect).
                    # asyncio.timeout waits in this task and lets every cancel through.
                    try:
                        async with asyncio.timeout(timeout):
                            item = await queue.get()
                    except TimeoutError:
                        raise RequestTimeout(f"no reply to {type(msg).__name__} within {timeout:g}s") from None
                else:
                    item = queue.get_nowait()
                cmd, reply, _ = self._decode(item)
                done, chunk = stream_step(cmd, reply)
                if chunk is not None:
                    yield chunk
                if done:
                    return
        finally:
            if done:
                self.waiters.pop(req_id, None)
            else:
                self._cancel(req_id)

    def close(self) -> None:
        self._fail_all(Unavailable("the gateway is closing this connection"))
        for sock in (self.sock, self.monitor):
            try:
                self.loop.remove_reader(sock.FD)
            except (ValueError, zmq.ZMQError):
                pass
        close_connection(self.sock, self.monitor)


def _expire(future: asyncio.Future, why: str) -> None:
    if not future.done():
        future.set_exception(RequestTimeout(why))


class Bus:
    """The gateway's connections, one per key, least recently used closed beyond `max_connections`."""

    def __init__(self, settings: Settings, max_connections: int = 256):
        self.settings = settings
        self.ctx = zmq.Context.instance()
        self.max_connections = max_connections
        self.connections: OrderedDict[bytes, Connection] = OrderedDict()
        self.api_keys: OrderedDict[str, keys.KeyFile] = OrderedDict()  # parsed once: z85 and curve math are slow

    def api_key(self, token: str, broker_key: bytes) -> keys.KeyFile:
        key = self.api_keys.get(token)
        if key is None:
            key = self.api_keys[token] = keys.key_from_api_key(token, broker_key)
            while len(self.api_keys) > self.max_connections:
                self.api_keys.popitem(last=False)
        return key

    def connection(self, key: keys.KeyFile) -> Connection:
        conn = self.connections.get(key.public)
        if conn is not None and conn.failure is None:
            self.connections.move_to_end(key.public)
            return conn
        if conn is not None:  # refused before (maybe revoked, maybe not yet known): try afresh
            conn.close()
        conn = self.connections[key.public] = Connection(self.ctx, self.settings, key)
        while len(self.connections) > self.max_connections:
            # The least recently used connection with nothing in flight: closing one with requests would fail
            # them (another caller's), so while every other one is busy the cap waits for the next call.
            idle = next((k for k, c in self.connections.items() if c is not conn and not c.waiters), None)
            if idle is None:
                break
            self.connections.pop(idle).close()
        return conn

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()
        self.connections.clear()

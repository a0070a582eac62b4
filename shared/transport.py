"""The service runtime shared by registry, scheduler and workers.

One I/O thread owns the DEALER socket to the broker (CURVE, with the service key): it heartbeats, reconnects
(and re-registers) when the broker goes away, decodes requests, checks the caller's role (stamped by the
broker) against ALLOWED_ROLES and hands them to handlers. Fast handlers run inline; the others run in a thread
pool, so a long request never blocks heartbeats or other requests. Pool threads send their replies through
per-thread inproc PUSH sockets that the I/O thread forwards, so only one thread touches the DEALER.

Services call each other through the same socket (`call`), so the broker stamps their requests with their
registered service name: a worker can tell that a LoadInstance really comes from the scheduler.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
import zmq

from zinfer.shared import keys, wire
from zinfer.shared import protocol as p
from zinfer.shared.config import Settings
from zinfer.shared.errors import Forbidden, RequestTimeout, Unavailable, error_from_reply, reply_from_exception

log = structlog.get_logger()

_END = p.encode(p.Ok(message="end of stream"))
EXIT_DENIED = 3  # exit_code of a runtime that gave up after the broker kept refusing its READY
_backend_send = zmq.backend.Socket.send
_MORE = zmq.SNDMORE


def send_frames(sock: zmq.Socket, frames: list, flags: int = 0, copy: bool = True) -> None:
    """send_multipart without pyzmq's per-call checks: about 5x cheaper for our small envelopes.

    Like send_multipart, a multipart message is atomic: ZeroMQ queues nothing until the last frame.
    """
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _backend_send(sock, frame, (flags | _MORE) if i < last else flags, copy=copy)


_inproc_ids = itertools.count()


DIE_WITH_PARENT = "ZINFER_DIE_WITH_PARENT"


def die_with_parent() -> None:
    """For processes that `zinfer up` (or a test harness) started, which set ZINFER_DIE_WITH_PARENT=1: ask Linux
    to SIGTERM us when the parent dies, so no orphan keeps a port or a GPU. A service started on its own (a
    worker on another host, under systemd or `setsid nohup`) keeps running when the shell that started it exits.

    Linux sends the signal when the *thread* that forked us ends: parents must spawn from a thread that lives as
    long as they do (`up` spawns from its main thread)."""
    if os.environ.get(DIE_WITH_PARENT) != "1":
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class RequestContext:
    """What a handler knows of its request besides the message: who asked, and whether it was cancelled.

    `cancelled` is a plain flag: the I/O thread sets it (CANCEL from the broker, shutdown), the thread doing the
    work polls it between steps; `why` is the answer a request stopped for another reason than its client gets
    (the service stopping: Unavailable, which a client retries, not Cancelled)."""

    __slots__ = ("client_id", "req_id", "caller", "cancelled", "why", "_runtime")

    def __init__(self, runtime: ServiceRuntime, client_id: bytes, req_id: bytes, caller: p.Caller):
        self._runtime = runtime
        self.client_id = client_id
        self.req_id = req_id
        self.caller = caller
        self.cancelled = False
        self.why: Exception | None = None

    def send(self, msg: p.Msg, buffers=(), final: bool = False) -> None:
        """A reply chunk (final=False) or the final reply; callable from any thread."""
        self._runtime.send(wire.peer_reply(self.client_id, self.req_id, p.encode(msg), buffers, final))

    def require_service(self, name: str, what: str) -> None:
        """Refuse unless the request came from the registered service `name` (e.g. the scheduler)."""
        if self.caller.role != p.SERVICE or self.caller.principal != name:
            raise Forbidden(f"{what} is accepted from the {name} only, not from {self.caller}")


Handler = Callable[[Any, RequestContext], Any]


class _Call:
    """A request this service sent (ServiceRuntime.call), waiting for its reply from the I/O thread."""

    __slots__ = ("event", "frames", "error")

    def __init__(self):
        self.event = threading.Event()
        self.frames: list | None = None
        self.error: Exception | None = None


def handlers_of(service, requests) -> dict[type, Handler]:
    """Each request type's handler: the service's method named after it (RegisterModel -> register_model)."""
    return {t: getattr(service, re.sub(r"(?<!^)(?=[A-Z])", "_", t.__name__).lower()) for t in requests}


def _pong(msg: p.Ping, ctx) -> p.Pong:
    return p.Pong(payload=msg.payload)


class ServiceRuntime:
    """Serve `handlers` (message type -> function) under `service` until stop() or SIGTERM/SIGINT.

    A handler returns a reply struct, a (reply, buffers) pair, or an iterator of chunks (a stream, whose end
    the runtime marks with a final Ok). Raising a ZinferError answers with that error.
    """

    def __init__(self, service: str, settings: Settings, handlers: dict[type, Handler],
                 inline: set[type] = frozenset(), max_workers: int = 32, deferred: set[type] = frozenset()):
        self.service = service
        self.settings = settings
        self.handlers = {p.Ping: _pong, **handlers}  # every service answers pings the same way, at once
        self.inline = {p.Ping, *inline}
        # Handlers that run inline and answer later from another thread (ctx.send(..., final=True)): the request
        # stays tracked (for CANCEL) until that final reply passes through here.
        self.deferred = set(deferred)
        self.ctx = zmq.Context.instance()
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=service.replace("/", "-"))
        self.inproc = f"inproc://zinfer-out-{os.getpid()}-{next(_inproc_ids)}"
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(self.inproc)
        self._local = threading.local()
        self._push_sockets: list[zmq.Socket] = []
        self._push_lock = threading.Lock()
        self.bound: set[str] = set()
        self.active: dict[tuple[bytes, bytes], RequestContext] = {}
        self.dealer: zmq.Socket | None = None
        self.broker_seen = 0.0
        self.running = True
        self.exit_code = 0
        self.connected = threading.Event()
        # Set once the broker has accepted our READY (its HEARTBEAT acknowledgement, or any request or heartbeat
        # after it); cleared when it refuses one (DENIED: the name is held by another live process). A reconnect
        # leaves it set: it says this process holds its name, not that the link is up this instant.
        self.joined = threading.Event()
        self.on_joined: Callable[[], None] | None = None
        self.on_reconnect: Callable[[], None] | None = None
        self._io_ident: int | None = None
        self.key = keys.load_service_key(settings.home_path)
        self._calls: dict[bytes, _Call] = {}
        self._call_ids = itertools.count(1)
        self._call_prefix = b"s" + os.urandom(3)
        self._callers: dict[bytes, p.Caller] = {}
        self.denied_since: float | None = None
        self.denied_reason = ""  # the broker's last refusal, until it accepts us
        self._next_ready = 0.0

    # ------------------------------------------------------------------ API for handler threads

    def send(self, frames: list) -> None:
        """Queue frames for the broker; callable from any thread."""
        if threading.get_ident() == self._io_ident:
            self._forward(frames)
            return
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.inproc)
            self._local.push = sock
            with self._push_lock:
                self._push_sockets.append(sock)
        sock.send_multipart(frames, copy=len(frames[-1]) < 65536)

    def bind(self, uid: str) -> None:
        self.send(wire.peer_bind(uid, True))

    def unbind(self, uid: str) -> None:
        self.send(wire.peer_bind(uid, False))

    def stop(self, *_args) -> None:
        self.running = False

    def call(self, target: str, msg: p.Msg, timeout: float | None = None):
        """Send a request as this service and wait for its reply (from any thread but the I/O thread)."""
        if threading.get_ident() == self._io_ident:
            raise RuntimeError("ServiceRuntime.call from the I/O thread would wait for itself")
        wait = self.settings.request_timeout if timeout is None else timeout
        req_id = self._call_prefix + next(self._call_ids).to_bytes(8, "big")
        pending = _Call()
        self._calls[req_id] = pending
        self.send(wire.client_request(target.encode(), req_id, p.encode(msg)))
        if not pending.event.wait(wait):
            self._calls.pop(req_id, None)
            self.send(wire.client_cancel(req_id))
            raise RequestTimeout(f"{target} did not answer {type(msg).__name__} within {wait:g}s")
        if pending.error is not None:
            raise pending.error
        try:
            reply = p.decode_reply(pending.frames[0])
        except p.Undecodable as exc:
            raise Unavailable(f"{target} answered {type(msg).__name__} with an undecodable reply: {exc}") from None
        if isinstance(reply, p.Error):
            raise error_from_reply(reply)
        return reply

    def _fail_calls(self, why: str) -> None:
        """Fail every call waiting now. The dict is emptied in place, never replaced: a call registering meanwhile
        lands in the one dict its reply is looked up in, and its request goes out on the new connection (a
        replaced dict once kept such a call from its reply, and it waited out its whole timeout)."""
        for req_id in list(self._calls):
            pending = self._calls.pop(req_id, None)
            if pending is not None:
                pending.error = Unavailable(why)
                pending.event.set()

    # ------------------------------------------------------------------ loop

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def _connect(self) -> None:
        if self.dealer is not None:
            self.dealer.close(linger=0)
            self._fail_calls(f"lost the broker at {self.settings.endpoint} before the reply came")
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.SNDHWM, self.settings.send_hwm)
        self.dealer.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
        # A connect that hears nothing (a broker host cut off) is retried after this, not after the kernel's
        # two minutes of SYN retries: a worker re-joins within about a heartbeat of its link coming back.
        self.dealer.setsockopt(zmq.CONNECT_TIMEOUT, max(250, int(self.settings.heartbeat_interval * 1000)))
        self.key.apply(self.dealer)
        self.dealer.connect(self.settings.endpoint)
        self._register()

    def _register(self) -> None:
        # A broker that asks us to register again (it restarted, or dropped us as silent) has already failed the
        # requests we hold: stop their work (a 2,048-text embed would otherwise run on for seconds, and the next
        # requests would wait behind it for nobody).
        for ctx in self.active.values():
            ctx.cancelled = True
        self.dealer.send_multipart(wire.peer_ready(self.service, sorted(self.bound)))
        self.broker_seen = time.monotonic()
        log.info("registered", endpoint=self.settings.endpoint, uids=len(self.bound), key=self.key.name)
        if self.on_reconnect is not None:
            self.on_reconnect()

    def _on_denied(self, reason: str) -> None:
        """The broker refused our READY: the name is held by a live process, or not this key's to hold. Retry
        each heartbeat interval (a holder cut off by the network expires within the liveness window); give up
        and exit when it lasts, so a second process for one name ends with the reason instead of lingering."""
        now = time.monotonic()
        if self.denied_since is None:
            self.denied_since = now
        self.denied_reason = reason
        log.error("registration_denied", service=self.service, reason=reason)
        give_up = max(10.0, 4 * self.settings.liveness_s)
        if now - self.denied_since > give_up:
            log.error("giving_up", service=self.service, reason=reason, denied_s=round(now - self.denied_since, 1))
            self.exit_code = EXIT_DENIED
            self.running = False
        self._next_ready = now + self.settings.heartbeat_interval

    def _joined(self) -> None:
        self.denied_since, self.denied_reason = None, ""
        if not self.joined.is_set():
            self.joined.set()
            if self.on_joined is not None:
                self.on_joined()

    def serve(self) -> None:
        self._io_ident = threading.get_ident()
        self._connect()
        self.connected.set()
        interval = self.settings.heartbeat_interval
        patience = self.settings.liveness_s  # doubles after each reconnect that hears nothing back
        next_beat = time.monotonic() + interval
        wait_ms = int(min(interval, 0.2) * 1000)
        while self.running:
            # zmq_poll straight, not zmq.Poller: this loop is on every request's path.
            ready = zmq.zmq_poll([(self.dealer, zmq.POLLIN), (self.pull, zmq.POLLIN)], wait_ms)
            if ready and ready[0][0] is self.dealer:
                self.broker_seen = time.monotonic()
                patience = self.settings.liveness_s
                dealer = self.dealer
                for _ in range(1000):
                    try:
                        frames = dealer.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_frames(frames)
                    if self.dealer is not dealer:  # a DISCONNECT made us reconnect
                        break
            if ready and ready[-1][0] is self.pull:
                for _ in range(1000):
                    try:
                        self._forward(self.pull.recv_multipart(zmq.NOBLOCK, copy=False))
                    except zmq.Again:
                        break
            now = time.monotonic()
            if self.denied_since is not None and now >= self._next_ready:
                self._next_ready = now + interval
                self.dealer.send_multipart(wire.peer_ready(self.service, sorted(self.bound)), zmq.NOBLOCK)
            if now >= next_beat:
                next_beat = now + interval
                self.dealer.send_multipart(wire.HEARTBEAT_FRAMES, zmq.NOBLOCK)
                if now - self.broker_seen > patience:
                    log.warning("broker_lost", silent_s=round(now - self.broker_seen, 2))
                    self._connect()  # a fresh socket, then READY with every bound uid
                    patience = min(patience * 2, 8 * self.settings.liveness_s)
        self._shutdown()

    def _shutdown(self) -> None:
        self._fail_calls(f"{self.service} is stopping")
        for ctx in list(self.active.values()):
            # Not the client's doing: an instance unloaded (keep_alive) or terminated while a request waited. The
            # client is told Unavailable, and loads it on request and sends again where it may.
            ctx.why = Unavailable(f"{self.service} stopped before it answered; send the request again")
            ctx.cancelled = True
        self.pool.shutdown(wait=True, cancel_futures=True)
        while True:  # flush replies produced while the pool wound down
            try:
                self._forward(self.pull.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                break
        try:
            self.dealer.send_multipart(wire.DISCONNECT_FRAMES, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        time.sleep(0.05)  # let the DISCONNECT leave before the socket closes
        self.dealer.close(linger=100)
        with self._push_lock:
            for sock in self._push_sockets:
                sock.close(linger=0)
        self.pull.close(linger=0)
        log.info("stopped")

    def _forward(self, frames: list) -> None:
        cmd = frames[0] if type(frames[0]) is bytes else frames[0].bytes
        if cmd == wire.REPLY:
            if self.active:
                key = tuple(f if type(f) is bytes else f.bytes for f in frames[1:3])
                self.active.pop(key, None)
        elif cmd in (wire.BIND, wire.UNBIND):
            uid = (frames[1] if type(frames[1]) is bytes else frames[1].bytes).decode()
            (self.bound.add if cmd == wire.BIND else self.bound.discard)(uid)
        try:
            # Small frames are cheaper copied; big ones (embeddings) go zero-copy.
            send_frames(self.dealer, frames, zmq.NOBLOCK, copy=len(frames[-1]) < 65536)
        except zmq.Again:
            log.warning("send_queue_full", dropped_command=cmd.hex())

    def _on_frames(self, frames: list[bytes]) -> None:
        cmd = frames[0]
        if cmd == wire.REQUEST and len(frames) >= 5:
            self._joined()
            self._on_request(frames[1], frames[2], frames[3], frames[4])
            return
        elif cmd == wire.REPLY and len(frames) >= 3:  # the answer to one of our own calls
            pending = self._calls.pop(frames[1], None)
            if pending is not None:
                pending.frames = frames[2:]
                pending.event.set()
        elif cmd == wire.CANCEL and len(frames) >= 3:
            ctx = self.active.get((frames[1], frames[2]))
            if ctx is not None:
                ctx.cancelled = True
        elif cmd == wire.HEARTBEAT:
            self._joined()  # the broker heartbeats registered peers only, and acknowledges a READY with one
        elif cmd == wire.DENIED:
            self.joined.clear()
            self._on_denied(frames[1].decode("utf-8", "replace") if len(frames) > 1 else "no reason given")
        elif cmd == wire.DISCONNECT:
            log.info("broker_asked_reregister")
            self._register()
        elif cmd != wire.PARTIAL:
            log.warning("frame_dropped", reason=f"unexpected header {cmd[:8]!r}")

    def _caller(self, stamp: bytes) -> p.Caller:
        caller = self._callers.get(stamp)
        if caller is None:
            caller = p.parse_caller(stamp)
            if len(self._callers) < 4096:  # callers are few (one per key or service name)
                self._callers[stamp] = caller
        return caller

    def _on_request(self, client_id: bytes, req_id: bytes, stamp: bytes, body: bytes) -> None:
        ctx = RequestContext(self, client_id, req_id, self._caller(stamp))
        try:
            msg = p.decode_request(body)
        except p.Undecodable as exc:
            ctx.send(p.Error(code="protocol", message=f"undecodable request: {exc}"), final=True)
            return
        handler = self.handlers.get(type(msg))
        if handler is None:
            ctx.send(p.Error(code="invalid", message=f"{self.service} does not serve {type(msg).__name__}"),
                     final=True)
            return
        if ctx.caller.role not in p.ALLOWED_ROLES.get(type(msg), ()):
            ctx.send(p.Error(code="forbidden", message=f"keys with the {ctx.caller.role} role may not send "
                             f"{type(msg).__name__} (this is key {ctx.caller.principal!r})"), final=True)
            return
        if type(msg) in self.deferred:
            key = (client_id, req_id)
            self.active[key] = ctx
            try:
                handler(msg, ctx)
            except Exception as exc:
                self.active.pop(key, None)
                self._fail(msg, ctx, exc)
        elif type(msg) in self.inline:
            self._run_inline(handler, msg, ctx)
        else:
            self.active[(client_id, req_id)] = ctx
            self.pool.submit(self._run, handler, msg, ctx)

    def _run_inline(self, handler: Handler, msg: Any, ctx: RequestContext) -> None:
        """The hot path (pings, lists, reports): no thread hop, no logging context."""
        try:
            result = handler(msg, ctx)
        except Exception as exc:
            self._fail(msg, ctx, exc)
            return
        if isinstance(result, p.Msg):
            send_frames(self.dealer, wire.peer_reply(ctx.client_id, ctx.req_id, p.encode(result)), zmq.NOBLOCK)
        else:
            self._run(lambda m, c: result, msg, ctx)

    def _run(self, handler: Handler, msg: Any, ctx: RequestContext) -> None:
        structlog.contextvars.bind_contextvars(request_id=ctx.req_id.hex())
        try:
            result = handler(msg, ctx)
            if isinstance(result, p.Msg):
                ctx.send(result, final=True)
            elif isinstance(result, Iterator):
                self._stream(result, ctx)
            elif isinstance(result, tuple):
                ctx.send(result[0], result[1], final=True)
            else:
                ctx.send(result, final=True)
        except Exception as exc:
            self._fail(msg, ctx, exc)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")

    def _fail(self, msg: Any, ctx: RequestContext, exc: Exception) -> None:
        reply = reply_from_exception(exc)
        if reply.code == "internal":
            log.error("handler_failed", request=type(msg).__name__, exc_info=exc)
        ctx.send(reply, final=True)

    def _stream(self, chunks: Iterator, ctx: RequestContext) -> None:
        try:
            for chunk in chunks:
                if ctx.cancelled:
                    break
                if isinstance(chunk, tuple):
                    ctx.send(chunk[0], chunk[1])
                else:
                    ctx.send(chunk)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        if ctx.cancelled:
            self.send(wire.peer_reply(ctx.client_id, ctx.req_id, p.error_body("cancelled", "stream cancelled")))
        else:
            self.send(wire.peer_reply(ctx.client_id, ctx.req_id, _END))

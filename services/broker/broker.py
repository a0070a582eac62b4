"""Majordomo-style broker. Routes on envelope frames only; bodies pass through undecoded.

Peers (services and workers) announce themselves with READY under a service name and BIND the model uids
they host. A request goes to the least busy live peer of its target; every request stays pending until its
REPLY so that a peer that dies (no heartbeat for `liveness` seconds) has all its requests answered with an
error. A request for a target nobody serves yet waits `unroutable_grace` seconds (services re-register after
a broker restart) and then gets an error.
"""

from __future__ import annotations

import signal
import time
from collections import deque

import structlog
import zmq

from shared import protocol as p
from shared.config import Settings
from shared.transport import send_frames

log = structlog.get_logger()

MAX_WAITING = 10_000  # requests parked for unknown targets, all targets together
DRAIN = 2000  # messages handled per poll wake-up


class Peer:
    __slots__ = ("identity", "service", "uids", "inflight", "last_seen")

    def __init__(self, identity: bytes, service: bytes, now: float):
        self.identity = identity
        self.service = service
        self.uids: set[bytes] = set()
        self.inflight = 0
        self.last_seen = now


class Broker:
    def __init__(self, settings: Settings, endpoint: str | None = None):
        self.settings = settings
        self.endpoint = endpoint or settings.endpoint
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unreachable client raises, so we can cancel
        self.sock.setsockopt(zmq.SNDHWM, settings.send_hwm)
        self.sock.setsockopt(zmq.RCVHWM, settings.send_hwm)
        self.peers: dict[bytes, Peer] = {}
        self.routes: dict[bytes, list[Peer]] = {}
        self.pending: dict[tuple[bytes, bytes], Peer] = {}
        self.waiting: dict[bytes, deque] = {}
        self.n_waiting = 0
        self.now = time.monotonic()
        self.dropped = 0
        self.running = True
        self._dispatch = {
            p.REQUEST: self._on_request,
            p.REPLY: self._on_reply,
            p.PARTIAL: self._on_reply,
            p.CANCEL: self._on_cancel,
            p.HEARTBEAT: self._on_heartbeat,
            p.READY: self._on_ready,
            p.BIND: self._on_bind,
            p.UNBIND: self._on_bind,
            p.DISCONNECT: self._on_disconnect,
        }

    def bind(self) -> None:
        """Bind the ROUTER; raises zmq.ZMQError (e.g. address in use) for the caller to report."""
        self.sock.bind(self.endpoint)
        if self.endpoint.endswith(":0"):
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # ------------------------------------------------------------------ loop

    def serve(self) -> None:
        interval = self.settings.heartbeat_interval
        next_tick = time.monotonic() + interval
        sock = self.sock
        recv = sock.recv_multipart
        # A blocking recv with a timeout waits inside ZeroMQ: one call per wake-up instead of poll + recv.
        sock.rcvtimeo = int(min(interval, 0.2) * 1000)

        def send(frames, flags):
            send_frames(sock, frames, flags)

        handle, routes, pending = self._handle, self.routes, self.pending
        REQUEST, REPLY, NOBLOCK = p.REQUEST, p.REPLY, zmq.NOBLOCK
        while self.running:
            try:
                first = recv()
            except zmq.Again:
                first = None
            if first is not None:
                self.now = time.monotonic()
                for i in range(DRAIN):
                    if i == 0:
                        frames = first
                    else:
                        try:
                            frames = recv(NOBLOCK)
                        except zmq.Again:
                            break
                    # Fast paths, inlined: a request to a target with one live peer, and a final reply.
                    # Everything else (and any send error) takes the general handlers.
                    try:
                        if len(frames) >= 5:
                            cmd = frames[1]
                            if cmd == REQUEST:
                                peers = routes.get(frames[2])
                                if peers and len(peers) == 1:
                                    peer = peers[0]
                                    send([peer.identity, REQUEST, frames[0], *frames[3:]], NOBLOCK)
                                    pending[(frames[0], frames[3])] = peer
                                    peer.inflight += 1
                                    continue
                            elif cmd == REPLY:
                                owner = pending.pop((frames[2], frames[3]), None)
                                if owner is not None and owner.identity == frames[0]:
                                    owner.inflight -= 1
                                    owner.last_seen = self.now
                                    send([frames[2], REPLY, *frames[3:]], NOBLOCK)
                                    continue
                                if owner is not None:
                                    pending[(frames[2], frames[3])] = owner
                    except zmq.ZMQError:
                        pass  # not delivered; the general path below answers for it
                    handle(frames)
            self.now = time.monotonic()
            if self.now >= next_tick:
                self._tick()
                next_tick = self.now + interval
        self.close()

    def close(self) -> None:
        for peer in list(self.peers.values()):
            self._send(peer.identity, p.DISCONNECT_FRAMES)
        self.sock.close(linger=0)

    def stop(self, *_args) -> None:
        self.running = False

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    # ------------------------------------------------------------------ frames

    def _handle(self, frames: list[bytes]) -> None:
        try:
            handler = self._dispatch.get(frames[1]) if len(frames) > 1 else None
            if handler is None:
                raise ValueError("not a zinfer header (wrong protocol, version or command)")
            handler(frames[0], frames)
        except Exception as exc:  # never die on input: log (rate-limited) and drop
            self.dropped += 1
            if self.dropped <= 10 or self.dropped % 1000 == 0:
                log.warning("frame_dropped", reason=str(exc)[:200], frames=len(frames), dropped=self.dropped)

    def _send(self, identity: bytes, frames: list) -> bool:
        return self._try_send(identity, frames) == 0

    def _try_send(self, identity: bytes, frames: list) -> int:
        """0 when queued, else the errno: EHOSTUNREACH (that identity left) or EAGAIN (its queue is full)."""
        try:
            send_frames(self.sock, [identity, *frames], zmq.NOBLOCK)
            return 0
        except zmq.ZMQError as exc:
            return exc.errno

    def _reply_error(self, client: bytes, req_id: bytes, code: str, message: str) -> None:
        self._send(client, [p.REPLY, req_id, p.error_body(code, message)])

    def _on_request(self, sender: bytes, frames: list[bytes]) -> None:
        # [sender, REQUEST, target, req_id, body, *buffers]
        if len(frames) < 5:
            raise ValueError("short REQUEST")
        target, req_id = frames[2], frames[3]
        if target == p.BROKER_TARGET:
            self._send(sender, [p.REPLY, req_id, p.encode(self.status())])
            return
        while True:
            peers = self.routes.get(target)
            if not peers:
                self._park(target, sender, frames)
                return
            peer = peers[0] if len(peers) == 1 else min(peers, key=_inflight)
            errno = self._try_send(peer.identity, [p.REQUEST, sender, req_id, *frames[4:]])
            if errno == 0:
                self.pending[(sender, req_id)] = peer
                peer.inflight += 1
                return
            if errno != zmq.EHOSTUNREACH:
                self._reply_error(sender, req_id, "unavailable",
                                  f"{peer.service.decode(errors='replace')} is overloaded; try again")
                return
            # Its connection is gone (the process died): drop it now rather than at heartbeat expiry.
            self._remove(peer, "disconnected")

    def _on_reply(self, sender: bytes, frames: list[bytes]) -> None:
        # [sender, REPLY|PARTIAL, client, req_id, body, *buffers]
        if len(frames) < 5:
            raise ValueError("short REPLY")
        client, req_id = frames[2], frames[3]
        peer = self.peers.get(sender)
        if peer is None:
            self._send(sender, p.DISCONNECT_FRAMES)
        else:
            peer.last_seen = self.now
        final = frames[1] == p.REPLY
        if final:
            owner = self.pending.pop((client, req_id), None)
            if owner is not None:
                owner.inflight -= 1
        delivered = self._send(client, [frames[1], req_id, *frames[4:]])
        if not delivered and not final and peer is not None:
            # The client is gone mid-stream: stop the work it started.
            self._send(sender, [p.CANCEL, client, req_id])
            if self.pending.pop((client, req_id), None) is not None:
                peer.inflight -= 1

    def _on_cancel(self, sender: bytes, frames: list[bytes]) -> None:
        if len(frames) < 3:
            raise ValueError("short CANCEL")
        key = (sender, frames[2])
        peer = self.pending.pop(key, None)
        if peer is not None:
            peer.inflight -= 1
            self._send(peer.identity, [p.CANCEL, sender, frames[2]])

    def _on_heartbeat(self, sender: bytes, frames: list[bytes]) -> None:
        peer = self.peers.get(sender)
        if peer is None:
            self._send(sender, p.DISCONNECT_FRAMES)  # a peer of an earlier broker: ask it to re-register
        else:
            peer.last_seen = self.now

    def _on_ready(self, sender: bytes, frames: list[bytes]) -> None:
        if len(frames) < 3 or not frames[2]:
            raise ValueError("READY without a service name")
        if sender in self.peers:
            self._remove(self.peers[sender], "re-registered")
        peer = Peer(sender, bytes(frames[2]), self.now)
        self.peers[sender] = peer
        self._route(peer, peer.service)
        for uid in frames[3:]:
            self._route(peer, bytes(uid))
        log.info("peer_ready", peer=peer.service.decode(errors="replace"), uids=len(frames) - 3)

    def _on_bind(self, sender: bytes, frames: list[bytes]) -> None:
        if len(frames) < 3 or not frames[2]:
            raise ValueError("BIND without a uid")
        peer = self.peers.get(sender)
        if peer is None:
            self._send(sender, p.DISCONNECT_FRAMES)
            return
        peer.last_seen = self.now
        uid = bytes(frames[2])
        if frames[1] == p.BIND:
            self._route(peer, uid)
        elif uid in peer.uids:
            peer.uids.discard(uid)
            self._unroute(peer, uid)

    def _on_disconnect(self, sender: bytes, frames: list[bytes]) -> None:
        peer = self.peers.get(sender)
        if peer is not None:
            self._remove(peer, "disconnected")

    # ------------------------------------------------------------------ bookkeeping

    def _route(self, peer: Peer, target: bytes) -> None:
        if target != peer.service:
            peer.uids.add(target)
        peers = self.routes.setdefault(target, [])
        if peer not in peers:
            peers.append(peer)
        for sender, frames, _ in self.waiting.pop(target, ()):
            self.n_waiting -= 1
            self._on_request(sender, frames)

    def _unroute(self, peer: Peer, target: bytes) -> None:
        peers = self.routes.get(target)
        if peers and peer in peers:
            peers.remove(peer)
            if not peers:
                del self.routes[target]

    def _remove(self, peer: Peer, why: str) -> None:
        self.peers.pop(peer.identity, None)
        self._unroute(peer, peer.service)
        for uid in peer.uids:
            self._unroute(peer, uid)
        service = peer.service.decode(errors="replace")
        # A scan, not a per-peer index: peers leave rarely, requests pass all the time.
        lost = [key for key, owner in self.pending.items() if owner is peer]
        for key in lost:
            del self.pending[key]
            self._reply_error(key[0], key[1], "unavailable", f"{service} {why} before answering this request")
        log.warning("peer_removed", peer=service, why=why, failed_requests=len(lost))

    def _park(self, target: bytes, sender: bytes, frames: list[bytes]) -> None:
        if self.n_waiting >= MAX_WAITING:
            self._reply_error(sender, frames[3], "unavailable", "broker queue full")
            return
        self.waiting.setdefault(target, deque()).append((sender, frames, self.now))
        self.n_waiting += 1

    def _tick(self) -> None:
        now = self.now
        dead_after = self.settings.liveness_s
        for peer in list(self.peers.values()):
            if now - peer.last_seen > dead_after:
                self._remove(peer, f"stopped answering (no heartbeat for {dead_after:g}s)")
            else:
                self._send(peer.identity, p.HEARTBEAT_FRAMES)
        grace = self.settings.unroutable_grace
        for target in list(self.waiting):
            queue = self.waiting[target]
            while queue and now - queue[0][2] > grace:
                sender, frames, _ = queue.popleft()
                self.n_waiting -= 1
                name = target.decode(errors="replace")
                self._reply_error(sender, frames[3], "unavailable",
                                  f"nothing serves {name!r} (no such service or model uid is running)")
            if not queue:
                del self.waiting[target]

    def status(self) -> p.BrokerStatusReply:
        return p.BrokerStatusReply(
            endpoint=self.endpoint,
            peers=[p.PeerView(service=peer.service.decode(errors="replace"),
                              uids=sorted(u.decode(errors="replace") for u in peer.uids),
                              inflight=peer.inflight, idle_s=round(self.now - peer.last_seen, 3))
                   for peer in self.peers.values()],
            pending=len(self.pending),
        )


def _inflight(peer: Peer) -> int:
    return peer.inflight

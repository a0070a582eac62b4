"""Majordomo-style broker. Routes on envelope frames only; bodies pass through undecoded.

Peers (services and workers) announce themselves with READY under a service name and BIND the model uids they host.
An accepted READY is answered with a HEARTBEAT at once, a refused one with DENIED, so a peer knows whether it joined
(an instance reports `ready` only then). A request goes to the least busy live peer of its target; every request
stays pending until its REPLY so that a peer that dies (no heartbeat for `liveness` seconds) has all its requests
answered with an error. A request for a target nobody serves yet waits `unroutable_grace` seconds (services
re-register after a broker restart) and then gets an error.

Trust: the socket is a CURVE server. At the handshake, ZAP (pyzmq's authenticator thread) lets in only the
public keys listed, unrevoked, in the roster (shared/keys.py); the roster is re-read when it changes, and every
message is checked against it again, so a revoked key is cut off at once, live connections included. The
role of the sender's key decides what it may do here:
- `service` keys may register (READY, BIND, UNBIND), heartbeat and answer requests; a service name is held by
  one live peer at a time, and only names the key may hold; model uids are bound under `model/` only.
- a REPLY or PARTIAL is forwarded only from the peer the request was sent to.
- every request reaches its peer stamped with the sender's role and name (`caller`, see shared/protocol.py);
  services check it before any handler runs.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections import deque

import structlog
import zmq
from zmq.auth.thread import ThreadAuthenticator

from zinfer.services.broker.roster import Known, Roster
from zinfer.shared import keys, wire
from zinfer.shared import protocol as p
from zinfer.shared.config import Settings
from zinfer.shared.endpoints import endpoint_holder
from zinfer.shared.transport import send_frames

log = structlog.get_logger()

DRAIN = 2000  # messages handled per poll wake-up
ZAP_DOMAIN = "zinfer"
MODEL_PREFIX = p.model_target("").encode()  # peers may bind model uids only, never a service's name
LEFT_MAX = 4096  # model uids remembered as left on purpose (see Broker.left)


class Peer:
    __slots__ = ("identity", "service", "uids", "inflight", "last_seen", "public_key", "caller", "key_name")

    def __init__(self, identity: bytes, service: bytes, now: float, public_key: str, key_name: str):
        self.identity = identity
        self.service = service
        self.uids: set[bytes] = set()
        self.inflight = 0
        self.last_seen = now
        self.public_key = public_key
        self.key_name = key_name
        self.caller = p.caller_stamp(p.SERVICE, service.decode(errors="replace"))


class Broker:
    def __init__(self, settings: Settings, endpoint: str | None = None):
        self.settings = settings
        self.endpoint = endpoint or settings.endpoint
        self.home = settings.home_path
        server_key = keys.load_broker_key(self.home)
        self.ctx = zmq.Context.instance()
        self.peers: dict[bytes, Peer] = {}
        self._asked: dict[bytes, float] = {}  # sockets told to register again, and when
        self.routes: dict[bytes, list[Peer]] = {}
        # Model uids whose only peer said goodbye (an instance unloaded or terminated, not one that crashed): a
        # request for one is answered no_route at once, not after unroutable_grace, so that a client loads an
        # idle-unloaded instance on request without waiting 2 s first. Oldest forgotten past LEFT_MAX.
        self.left: dict[bytes, None] = {}
        self.pending: dict[tuple[bytes, bytes], Peer] = {}
        self.roster = Roster(self.home)
        # ZAP: the handshake of every connection asks `callback` (in the authenticator's thread).
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve_callback(ZAP_DOMAIN, self.roster)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unreachable client raises, so we can cancel
        self.sock.setsockopt(zmq.SNDHWM, settings.send_hwm)
        self.sock.setsockopt(zmq.RCVHWM, settings.send_hwm)
        self.sock.setsockopt(zmq.MAXMSGSIZE, settings.max_message_bytes)
        self.sock.curve_server = True
        self.sock.curve_secretkey = server_key.secret
        self.sock.curve_publickey = server_key.public
        self.sock.zap_domain = ZAP_DOMAIN.encode()
        # A connection that closes (a process that died) is seen at once: a monitor thread flags it, and the loop
        # then probes its peers (a send to a gone identity fails at once), instead of at the next heartbeat tick.
        self.peer_left = threading.Event()
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        threading.Thread(target=self._watch_disconnects, name="disconnects", daemon=True).start()
        self._next_probe = 0.0
        self.waiting: dict[bytes, deque] = {}
        self.n_waiting = 0
        self.waiting_bytes = 0
        self.now = time.monotonic()
        self.dropped = 0
        self.running = True
        self._dispatch = {
            wire.REQUEST: self._on_request,
            wire.REPLY: self._on_reply,
            wire.PARTIAL: self._on_reply,
            wire.CANCEL: self._on_cancel,
            wire.HEARTBEAT: self._on_heartbeat,
            wire.READY: self._on_ready,
            wire.BIND: self._on_bind,
            wire.UNBIND: self._on_bind,
            wire.DISCONNECT: self._on_disconnect,
        }

    def bind(self) -> None:
        """Bind the ROUTER; raises zmq.ZMQError (e.g. address in use) for the caller to report. An ipc path that a
        live process accepts on is refused here: libzmq would unlink it and take it over silently."""
        raise_open_files_limit()
        holder = endpoint_holder(self.endpoint)
        if holder is not None:
            raise zmq.ZMQError(errno.EADDRINUSE, f"{self.endpoint} is in use by {holder}")
        self.sock.bind(self.endpoint)
        if self.endpoint.endswith(":0"):
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # ------------------------------------------------------------------ keys

    def _prune_revoked(self) -> None:
        for peer in list(self.peers.values()):
            if peer.public_key not in self.roster.known:
                self._send(peer.identity, wire.DISCONNECT_FRAMES)
                self._remove(peer, "its key was revoked")

    # ------------------------------------------------------------------ loop

    def serve(self) -> None:
        interval = self.settings.heartbeat_interval
        next_tick = time.monotonic() + interval
        sock = self.sock
        recv, more = zmq.backend.Socket.recv, zmq.backend.Socket.get
        RCVMORE = zmq.RCVMORE
        # A blocking recv with a timeout waits inside ZeroMQ: one call per wake-up instead of poll + recv.
        sock.rcvtimeo = int(min(interval, 0.2) * 1000)

        def send(frames, flags):
            send_frames(sock, frames, flags)

        handle, routes, pending, peers = self._handle, self.routes, self.pending, self.peers
        REQUEST, REPLY, NOBLOCK = wire.REQUEST, wire.REPLY, zmq.NOBLOCK
        route_request, route_reply = wire.route_request, wire.route_reply
        while self.running:
            try:
                head = recv(sock, copy=False)
            except zmq.Again:
                head = None
            if head is not None:
                self.now = time.monotonic()
                known = self.roster.known
                for i in range(DRAIN):
                    if i:
                        try:
                            head = recv(sock, NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                    # The key this message came with (ZAP's User-Id is the z85 public key), checked per message
                    # so that revoking a key cuts off its live connections too.
                    try:
                        key = known.get(head.get("User-Id"))
                    except zmq.ZMQError:
                        key = None
                    frames = [head.bytes]
                    while more(sock, RCVMORE):
                        frames.append(recv(sock))
                    if key is None:
                        self._refuse(frames)
                        continue
                    # Fast paths, inlined: a request to a target with one live peer, and a final reply from the
                    # peer that owns the request. Everything else (and any send error) takes the general handlers.
                    try:
                        if len(frames) >= 5:
                            cmd = frames[1]
                            if cmd == REQUEST:
                                targets = routes.get(frames[2])
                                if targets and len(targets) == 1:
                                    peer = targets[0]
                                    sender = peers.get(frames[0])
                                    caller = sender.caller if sender is not None else key.stamp
                                    send(route_request(peer.identity, frames[0], frames[3], caller, frames[4:]),
                                         NOBLOCK)
                                    pending[(frames[0], frames[3])] = peer
                                    peer.inflight += 1
                                    continue
                            elif cmd == REPLY:
                                owner = pending.pop((frames[2], frames[3]), None)
                                if owner is not None and owner.identity == frames[0]:
                                    owner.inflight -= 1
                                    owner.last_seen = self.now
                                    send(route_reply(frames[2], REPLY, frames[3], frames[4:]), NOBLOCK)
                                    continue
                                if owner is not None:
                                    pending[(frames[2], frames[3])] = owner
                    except zmq.ZMQError:
                        pass  # not delivered; the general path below answers for it
                    handle(frames, key)
            self.now = time.monotonic()
            if self.peer_left.is_set() and self.now >= self._next_probe:
                self.peer_left.clear()
                self._next_probe = self.now + 0.05  # at most 20 probes a second, whatever the churn of clients
                self._probe_peers()
            if self.now >= next_tick:
                self._tick()
                next_tick = self.now + interval
        self.close()

    def _watch_disconnects(self) -> None:
        """The monitor's thread: flag each closed connection for the loop (which owns the ROUTER)."""
        from zmq.utils.monitor import recv_monitor_message

        try:
            while True:
                try:
                    event = recv_monitor_message(self._monitor)
                except (zmq.ZMQError, ValueError):
                    return
                if event.get("event") == zmq.EVENT_DISCONNECTED:
                    self.peer_left.set()
                elif event.get("event") == zmq.EVENT_MONITOR_STOPPED:
                    return
        finally:
            self._monitor.close(linger=0)

    def _probe_peers(self) -> None:
        """A heartbeat to every peer: one whose connection is gone is removed now, and its pending requests are
        answered `unavailable` (a crashed instance's clients hear it at once)."""
        for peer in list(self.peers.values()):
            if self._send_raw(wire.to_peer(peer.identity, wire.HEARTBEAT_FRAMES)) == zmq.EHOSTUNREACH:
                self._remove(peer, "disconnected")

    def close(self) -> None:
        for peer in list(self.peers.values()):
            self._send(peer.identity, wire.DISCONNECT_FRAMES)
        try:
            self.sock.disable_monitor()  # the monitor's thread hears MONITOR_STOPPED and closes its socket
        except zmq.ZMQError:
            pass
        self.sock.close(linger=0)
        self.auth.stop()

    def stop(self, *_args) -> None:
        self.running = False

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    # ------------------------------------------------------------------ frames

    def _handle(self, frames: list[bytes], key: Known) -> None:
        try:
            handler = self._dispatch.get(frames[1]) if len(frames) > 1 else None
            if handler is None:
                raise ValueError("not a zinfer header (wrong protocol, version or command)")
            handler(frames[0], frames, key)
        except Exception as exc:  # never die on input: log (rate-limited) and drop
            self._dropped(str(exc)[:200], frames)

    def _dropped(self, reason: str, frames: list) -> None:
        self.dropped += 1
        if self.dropped <= 10 or self.dropped % 1000 == 0:
            log.warning("frame_dropped", reason=reason, frames=len(frames), dropped=self.dropped)

    def _refuse(self, frames: list[bytes]) -> None:
        """A message from a key that is no longer in the roster (revoked while connected)."""
        if len(frames) >= 4 and frames[1] == wire.REQUEST:
            self._send_raw(wire.broker_error(frames[0], frames[3], "unauthenticated",
                                          "this client's key was revoked; ask an admin for a new one"))
        elif len(frames) >= 2 and frames[1] == wire.READY:
            self._send(frames[0], wire.denied("this key was revoked"))
        self._dropped("revoked or unknown key", frames)

    def _send(self, identity: bytes, frames: list) -> bool:
        return self._send_raw(wire.to_peer(identity, frames)) == 0

    def _send_raw(self, frames: list) -> int:
        """0 when queued, else the errno: EHOSTUNREACH (that identity left) or EAGAIN (its queue is full)."""
        try:
            send_frames(self.sock, frames, zmq.NOBLOCK)
            return 0
        except zmq.ZMQError as exc:
            return exc.errno

    def _reply_error(self, client: bytes, req_id: bytes, code: str, message: str) -> None:
        self._send_raw(wire.broker_error(client, req_id, code, message))

    def _on_request(self, sender: bytes, frames: list[bytes], key: Known) -> None:
        # [sender, REQUEST, target, req_id, body, *buffers]
        if len(frames) < 5:
            raise ValueError("short REQUEST")
        target, req_id = frames[2], frames[3]
        origin = self.peers.get(sender)
        caller = origin.caller if origin is not None else key.stamp
        if target == p.BROKER_TARGET:
            self._send_raw(wire.broker_reply(sender, req_id, self.status(caller)))
            return
        while True:
            peers = self.routes.get(target)
            if not peers and target in self.left:
                name = target.decode(errors="replace")
                self._reply_error(sender, req_id, "no_route", f"nothing serves {name!r} (its instance was unloaded "
                                  "or terminated)")
                return
            if not peers:
                self._park(target, sender, frames, key)
                return
            peer = peers[0] if len(peers) == 1 else min(peers, key=_inflight)
            errno = self._send_raw(wire.route_request(peer.identity, sender, req_id, caller, frames[4:]))
            if errno == 0:
                self.pending[(sender, req_id)] = peer
                peer.inflight += 1
                return
            if errno != zmq.EHOSTUNREACH:
                self._reply_error(sender, req_id, "queue_full",
                                  f"{peer.service.decode(errors='replace')} is overloaded; try again")
                return
            # Its connection is gone (the process died): drop it now rather than at heartbeat expiry.
            self._remove(peer, "disconnected")

    def _on_reply(self, sender: bytes, frames: list[bytes], key: Known) -> None:
        # [sender, REPLY|PARTIAL, client, req_id, body, *buffers]
        if len(frames) < 5:
            raise ValueError("short REPLY")
        client, req_id = frames[2], frames[3]
        peer = self.peers.get(sender)
        owner = self.pending.get((client, req_id))
        if peer is None or owner is not peer:
            # Only the peer a request went to may answer it. A late reply to a cancelled request is normal;
            # one from a socket that is not a registered peer is a forgery.
            if peer is None:
                self._ask_to_register(sender)
                self._dropped(f"reply from {key.role} key {key.name!r}, which is not a registered peer", frames)
            return
        peer.last_seen = self.now
        final = frames[1] == wire.REPLY
        if final:
            del self.pending[(client, req_id)]
            peer.inflight -= 1
        delivered = self._send_raw(wire.route_reply(client, frames[1], req_id, frames[4:])) == 0
        if not delivered and not final:
            # The client is gone mid-stream: stop the work it started.
            self._send_raw(wire.route_cancel(sender, client, req_id))
            if self.pending.pop((client, req_id), None) is not None:
                peer.inflight -= 1

    def _on_cancel(self, sender: bytes, frames: list[bytes], key: Known) -> None:
        if len(frames) < 3:
            raise ValueError("short CANCEL")
        peer = self.pending.pop((sender, frames[2]), None)
        if peer is not None:
            peer.inflight -= 1
            self._send_raw(wire.route_cancel(peer.identity, sender, frames[2]))

    def _ask_to_register(self, sender: bytes) -> None:
        """DISCONNECT to a socket that is not a registered peer: it registers again. Once per heartbeat interval
        per socket: the heartbeats a peer queued while the broker was away arrive together, and a DISCONNECT for
        each would have it register once for each, every READY after the first failing the requests it took
        meanwhile ("re-registered")."""
        if self.now - self._asked.get(sender, -1e9) < self.settings.heartbeat_interval:
            return
        self._asked[sender] = self.now
        self._send(sender, wire.DISCONNECT_FRAMES)

    def _on_heartbeat(self, sender: bytes, frames: list[bytes], key: Known) -> None:
        peer = self.peers.get(sender)
        if peer is not None:
            peer.last_seen = self.now
        elif key.role == p.SERVICE:
            self._ask_to_register(sender)  # a peer of an earlier broker, or one dropped as silent

    def _on_ready(self, sender: bytes, frames: list[bytes], key: Known) -> None:
        if len(frames) < 3 or not frames[2]:
            raise ValueError("READY without a service name")
        service = bytes(frames[2])
        name = service.decode(errors="replace")
        if key.role != p.SERVICE:
            self._send(sender, wire.denied(f"a {key.role} key cannot register a service"))
            self._dropped(f"READY {name!r} from {key.role} key {key.name!r}", frames)
            return
        if service.startswith(MODEL_PREFIX) or not key.entry.may_hold(name):
            self._send(sender, wire.denied(f"key {key.name!r} may not hold the name {name!r}"))
            self._dropped(f"READY {name!r} from key {key.name!r}, which may not hold it", frames)
            return
        holder = next((peer for peer in self.routes.get(service, ()) if peer.service == service), None)
        if holder is not None and holder.identity != sender:
            # A name is held by one live peer. A restarted process takes it over from a dead one: a probe to the
            # holder fails at once when its connection is gone (ROUTER_MANDATORY).
            if self._send(holder.identity, wire.HEARTBEAT_FRAMES):
                self._send(sender, wire.denied(f"{name} is held by a live peer (key {holder.key_name!r}); "
                                            "a second process cannot take it while the first answers"))
                self._dropped(f"READY {name!r}: held by a live peer", frames)
                return
            self._remove(holder, "replaced by a new process")
        if sender in self.peers:
            self._remove(self.peers[sender], "re-registered")
        peer = Peer(sender, service, self.now, key.entry.public_key, key.name)
        self.peers[sender] = peer
        self._route(peer, peer.service)
        for uid in frames[3:]:
            if bytes(uid).startswith(MODEL_PREFIX):
                self._route(peer, bytes(uid))
        self._send(sender, wire.HEARTBEAT_FRAMES)  # the acknowledgement: it holds its name and routes now
        log.info("peer_ready", peer=name, key=key.name, uids=len(frames) - 3)

    def _on_bind(self, sender: bytes, frames: list[bytes], key: Known) -> None:
        if len(frames) < 3 or not frames[2]:
            raise ValueError("BIND without a uid")
        peer = self.peers.get(sender)
        if peer is None:
            if key.role == p.SERVICE:
                self._ask_to_register(sender)
            return
        peer.last_seen = self.now
        uid = bytes(frames[2])
        if not uid.startswith(MODEL_PREFIX):
            raise ValueError(f"BIND of {uid[:40]!r}: peers bind model uids only")
        if frames[1] == wire.BIND:
            self._route(peer, uid)
        elif uid in peer.uids:
            peer.uids.discard(uid)
            self._unroute(peer, uid)

    def _on_disconnect(self, sender: bytes, frames: list[bytes], key: Known) -> None:
        peer = self.peers.get(sender)
        if peer is not None:
            self._remove(peer, "disconnected")
            for uid in peer.uids:  # it left on purpose: its uids are not coming back by themselves
                if uid not in self.routes:
                    self.left[uid] = None
            while len(self.left) > LEFT_MAX:
                del self.left[next(iter(self.left))]

    # ------------------------------------------------------------------ bookkeeping

    def _route(self, peer: Peer, target: bytes) -> None:
        self.left.pop(target, None)
        if target != peer.service:
            peer.uids.add(target)
        peers = self.routes.setdefault(target, [])
        if peer not in peers:
            peers.append(peer)
        for sender, frames, _, size, key in self.waiting.pop(target, ()):
            self.n_waiting -= 1
            self.waiting_bytes -= size
            self._on_request(sender, frames, key)

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

    def _park(self, target: bytes, sender: bytes, frames: list[bytes], key: Known) -> None:
        size = sum(len(f) for f in frames)
        if (self.n_waiting >= self.settings.park_max_requests
                or self.waiting_bytes + size > self.settings.park_max_mb * 2**20):
            name = target.decode(errors="replace")
            self._reply_error(sender, frames[3], "queue_full",
                              f"nothing serves {name!r} yet and the broker's queue for such requests is full")
            return
        self.waiting.setdefault(target, deque()).append((sender, frames, self.now, size, key))
        self.n_waiting += 1
        self.waiting_bytes += size

    def _tick(self) -> None:
        now = self.now
        self._asked = {s: t for s, t in self._asked.items() if now - t < self.settings.heartbeat_interval}
        self.roster.refresh()
        self._prune_revoked()  # always: the authenticator thread may have been the one to see the change
        dead_after = self.settings.liveness_s
        for peer in list(self.peers.values()):
            if now - peer.last_seen > dead_after:
                self._remove(peer, f"stopped answering (no heartbeat for {dead_after:g}s)")
            elif self._send_raw(wire.to_peer(peer.identity, wire.HEARTBEAT_FRAMES)) == zmq.EHOSTUNREACH:
                # Its connection is gone (the process died): known now, not at the end of the liveness window.
                self._remove(peer, "disconnected")
        grace = self.settings.unroutable_grace
        for target in list(self.waiting):
            queue = self.waiting[target]
            while queue and now - queue[0][2] > grace:
                sender, frames, _, size, _key = queue.popleft()
                self.n_waiting -= 1
                self.waiting_bytes -= size
                name = target.decode(errors="replace")
                self._reply_error(sender, frames[3], "no_route",
                                  f"nothing serves {name!r} (no such service or model uid is running)")
            if not queue:
                del self.waiting[target]

    def status(self, caller: bytes = b"") -> p.BrokerStatusReply:
        return p.BrokerStatusReply(
            caller=caller.decode(errors="replace"),
            endpoint=self.endpoint,
            peers=[p.PeerView(service=peer.service.decode(errors="replace"),
                              uids=sorted(u.decode(errors="replace") for u in peer.uids),
                              inflight=peer.inflight, idle_s=round(self.now - peer.last_seen, 3),
                              key=peer.key_name)
                   for peer in self.peers.values()],
            pending=len(self.pending),
            parked=self.n_waiting,
            pid=os.getpid(),
        )


def raise_open_files_limit() -> int:
    """Every peer's connection is a file descriptor: the common soft limit of 1,024 would refuse the thousandth
    worker or client (bench/fanout.py runs 1,000 peers). Raised to the hard limit, which needs no privilege."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def _inflight(peer: Peer) -> int:
    return peer.inflight

"""The envelope: ZeroMQ multipart frames around the message bodies of shared/protocol.py. Nobody else builds them.

Frames (ZeroMQ multipart over CURVE; the broker reads only the envelope, never the body):

    client -> broker   [REQUEST, target, req_id, body, *buffers]
    broker -> peer     [REQUEST, client_id, req_id, caller, body, *buffers]
    peer   -> broker   [PARTIAL|REPLY, client_id, req_id, body, *buffers]
    broker -> client   [PARTIAL|REPLY, req_id, body, *buffers]
    client -> broker   [CANCEL, req_id]                   broker -> peer [CANCEL, client_id, req_id]
    peer   -> broker   [READY, service_name, *uids] | [BIND|UNBIND, uid] | [HEARTBEAT]
    broker -> peer     [HEARTBEAT] | [DISCONNECT] | [DENIED, reason]

The first frame is the header: the protocol name and version (PROTO) followed by a one-byte command, so a
reader checks the version and routes with one comparison (one frame fewer per hop than separate frames).
PARTIAL is one chunk of a streamed reply; REPLY ends every request (a single answer, the stream's last chunk,
or an error). The body is a msgpack-encoded struct of shared/protocol.py's `Request` or `Reply` union; `buffers`
carry raw arrays (float32 embeddings) without copying.
"""

from __future__ import annotations

from zinfer.shared.protocol import Msg, encode, error_body

PROTOCOL_VERSION = 2
PROTO = b"ZINF" + str(PROTOCOL_VERSION).encode()  # b"ZINF2"

READY = PROTO + b"\x01"
BIND = PROTO + b"\x02"
UNBIND = PROTO + b"\x03"
HEARTBEAT = PROTO + b"\x04"
DISCONNECT = PROTO + b"\x05"
DENIED = PROTO + b"\x06"  # the broker refused a READY/BIND (name held by a live peer, or not this key's to hold)
REQUEST = PROTO + b"\x10"
CANCEL = PROTO + b"\x11"
PARTIAL = PROTO + b"\x20"
REPLY = PROTO + b"\x21"


# ---------------------------------------------------------------- frame builders (nobody else builds frames)


def client_request(target: bytes, req_id: bytes, body: bytes, buffers=()) -> list:
    return [REQUEST, target, req_id, body, *buffers]


def client_cancel(req_id: bytes) -> list:
    return [CANCEL, req_id]


def peer_reply(client_id: bytes, req_id: bytes, body: bytes, buffers=(), final: bool = True) -> list:
    return [REPLY if final else PARTIAL, client_id, req_id, body, *buffers]


def peer_ready(service: str, uids=()) -> list:
    return [READY, service.encode(), *(u.encode() for u in uids)]


def peer_bind(uid: str, bind: bool = True) -> list:
    return [BIND if bind else UNBIND, uid.encode()]


HEARTBEAT_FRAMES = [HEARTBEAT]
DISCONNECT_FRAMES = [DISCONNECT]

# What the broker sends; each takes the destination's routing identity first (ROUTER addressing).


def route_request(peer: bytes, client: bytes, req_id: bytes, caller: bytes, rest) -> list:
    """A client's request on its way to a peer; `rest` is [body, *buffers] as received."""
    return [peer, REQUEST, client, req_id, caller, *rest]


def route_reply(client: bytes, command: bytes, req_id: bytes, rest) -> list:
    """A peer's PARTIAL/REPLY on its way to the client; `rest` is [body, *buffers] as received."""
    return [client, command, req_id, *rest]


def route_cancel(peer: bytes, client: bytes, req_id: bytes) -> list:
    return [peer, CANCEL, client, req_id]


def broker_error(client: bytes, req_id: bytes, code: str, message: str) -> list:
    return [client, REPLY, req_id, error_body(code, message)]


def broker_reply(client: bytes, req_id: bytes, msg: Msg) -> list:
    return [client, REPLY, req_id, encode(msg)]


def to_peer(identity: bytes, frames: list) -> list:
    """HEARTBEAT_FRAMES or DISCONNECT_FRAMES (or denied(...)) for one peer."""
    return [identity, *frames]


def denied(reason: str) -> list:
    return [DENIED, reason.encode()]

"""What a bus client does, without the I/O: the one core under the sync client (shared/client.py) and the
gateway's asyncio connections (services/gateway/bus.py), which only move frames.

Request ids and frames (with the message-size limit), reading a reply (typed errors, an undecodable body),
where a stream ends, what a connection's monitor events mean, when a launch being waited for is done, and
the shapes of results (plain dicts, embeddings). Pure functions and small classes: unit-tested without a mesh.
"""

from __future__ import annotations

import base64
import itertools
import os
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from zinfer.shared import instances, wire
from zinfer.shared import protocol as p
from zinfer.shared.errors import (
    InstanceNotReady,
    NoRoute,
    NotFound,
    QueueFull,
    RequestTimeout,
    TooLarge,
    Unauthenticated,
    Unavailable,
    ZinferError,
    error_class,
    error_from_reply,
)

if TYPE_CHECKING:
    import numpy as np

# What a client's monitor socket listens for: the CURVE handshake's outcome and disconnects.
MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                  | zmq.EVENT_DISCONNECTED)
CONNECT_TIMEOUT = 3.0  # seconds a new connection has to complete its handshake


def close_connection(sock: zmq.Socket, monitor: zmq.Socket) -> None:
    """Close a client's DEALER and its monitor (the monitor first stopped, so nothing writes to a closed pair)."""
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    monitor.close(linger=0)
    sock.close(linger=0)


# Fields OpenAI leaves out when they have nothing to say (a message's reasoning and tool calls, usage details).
ABSENT_WHEN_NONE = frozenset({"reasoning_content", "reasoning", "tool_calls", "completion_tokens_details"})


def as_plain(obj: Any) -> Any:
    """A reply struct as plain dicts and lists with every field present (what Xinference's client returns), but
    for those of ABSENT_WHEN_NONE when they are None."""
    if isinstance(obj, msgspec.Struct):
        return {f: as_plain(v) for f in obj.__struct_fields__ if f != "op" and
                ((v := getattr(obj, f)) is not None or f not in ABSENT_WHEN_NONE)}
    if isinstance(obj, list | tuple):
        return [as_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_plain(v) for k, v in obj.items()}
    return obj


def view_plain(view: instances.InstanceView) -> dict:
    """A launched model as the Python client and the HTTP gateway give it: the model's fields at the top, as
    Xinference's list_models has them, then its replicas' state ("error": None, or the Error's code, message
    and field)."""
    out = as_plain(view)
    return {"model_uid": out.pop("model_uid"), **out.pop("info"), **out}


class Requests:
    """Request ids (a random prefix per connection, then a counter) and the frames of a request."""

    def __init__(self, max_message_bytes: int, max_message_mb: int):
        self.prefix = os.urandom(4)
        self.ids = itertools.count(1)
        self.max_bytes = max_message_bytes
        self.max_mb = max_message_mb

    def frames(self, target: str | bytes, msg: p.Msg, buffers=()) -> tuple[bytes, list]:
        """(request id, frames); TooLarge before anything is sent when the message is over the limit."""
        body = p.encode(msg)
        size = len(body) + sum(len(b) for b in buffers)
        if size > self.max_bytes:
            raise TooLarge(f"this {type(msg).__name__} is {size:,} bytes; messages are limited to "
                           f"{self.max_mb} MiB (max_message_mb)")
        req_id = self.prefix + next(self.ids).to_bytes(8, "big")
        target_b = target if isinstance(target, bytes) else target.encode()
        return req_id, wire.client_request(target_b, req_id, body, buffers)


def _bytes(frame) -> bytes:
    return frame if type(frame) is bytes else frame.bytes


def read_reply(frames: list) -> tuple[bytes, p.Msg, list]:
    """(REPLY or PARTIAL, the reply, its buffers) from a reply's frames [cmd, req_id, body, *buffers]; an Error
    raises its typed exception, a body that does not decode raises Unavailable."""
    body = frames[2]
    try:
        reply = p.decode_reply(body if type(body) is bytes else body.buffer)
    except p.Undecodable as exc:
        raise Unavailable(f"undecodable reply: {exc}") from None
    if isinstance(reply, p.Error):
        raise error_from_reply(reply)
    return _bytes(frames[0]), reply, frames[3:]


def stream_step(cmd: bytes, reply: p.Msg) -> tuple[bool, p.Msg | None]:
    """(is this the end, the chunk to hand on or None): a stream ends with its final REPLY, which is either its
    last chunk or the runtime's closing Ok (not a chunk)."""
    if cmd == wire.REPLY:
        return True, None if isinstance(reply, p.Ok) else reply
    return False, reply


class MonitorState:
    """What a connection's monitor events mean: up (handshake done), lost (a disconnect since the last request),
    or a failure that no retry fixes (the key was refused)."""

    def __init__(self, refused: str, mismatch: str):
        self.up = False
        self.lost = False
        self.failure: ZinferError | None = None
        self._refused, self._mismatch = refused, mismatch

    def apply(self, kind: int) -> ZinferError | None:
        """Take one event; returns the error that pending requests should fail with, if any."""
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.up = True
        elif kind == zmq.EVENT_DISCONNECTED:
            self.up, self.lost = False, True
            return Unavailable("lost the connection to the broker")
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.failure = Unauthenticated(self._refused)
            return self.failure
        elif kind in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL) and not self.up:
            self.failure = Unauthenticated(self._mismatch)
            return self.failure
        return None


def launch_done(uid: str, view: instances.InstanceView, expired: bool, timeout: float) -> bool:
    """While waiting for a launch: True once ready; a failed launch raises its own error (type and field);
    still loading past the deadline raises RequestTimeout; else False (ask again)."""
    if view.state in ("ready", "idle-unloaded"):  # idle-unloaded: loaded, and unloaded again since (keep_alive)
        return True
    if view.state == "failed":
        error = view.error or p.Error(code="internal", message="no cause was given")
        raise error_class(error.code)(f"model {uid!r} failed to launch: {error.message}", error.field)
    if expired:
        raise RequestTimeout(f"model {uid!r} is still {view.state} after {timeout:g}s")
    return False


LAUNCH_POLL_S = 0.05  # how often a launch being waited for is asked after


def not_serving(uid: str, exc: ZinferError, view: instances.InstanceView | None, field: str) -> ZinferError:
    """A request that found nothing serving its model (NoRoute) says why: no such uid, or the instance's state
    (from the scheduler's view, None when it has none). Any other error passes through as it is."""
    if not isinstance(exc, NoRoute):
        return exc
    if view is None:
        return NotFound(f"no launched model has uid {uid!r}", field=field)
    if view.state == "ready":  # the scheduler's view is ahead of the broker: the instance is joining it now
        return Unavailable(f"model {uid!r} is ready but its instance has not joined the broker yet (it is "
                           "starting again); send the request again", field=field)
    detail = f": {view.error.message}" if view.error else ""
    return InstanceNotReady(f"model {uid!r} is {view.state}{detail}", field=field)


# Loads on request one request may cause: more than one only when its instance is unloaded again before the
# request gets through (keep_alive 0, with other requests in between).
WAKES = 3


def could_be_unloaded(exc: ZinferError) -> bool:
    """An error a request gets when its instance is not loaded: nothing serves its uid, the instance is not
    ready, or it was unloaded while the request waited (worth asking the scheduler about its state)."""
    # A full queue is Unavailable too, but says the instance is loaded and busy: no scheduler call for it, which
    # would add a round trip to every refusal exactly when the mesh is overloaded.
    return isinstance(exc, NoRoute | InstanceNotReady | Unavailable) and not isinstance(exc, QueueFull)


def wakeable(view: instances.InstanceView | None) -> bool:
    """An instance a request loads on request: unloaded (idle for its keep_alive, made room for another, not
    restored at start, or a load on request that failed), or loading on request now (then it waits too)."""
    return view is not None and (view.unloaded_at > 0 or view.loading_on_request)


# The steps of recover(), which its driver performs: ask the scheduler for the model's view (the result sent back:
# the InstanceView, or the error the call raised, thrown in), load it on request, wait until it is ready.
DESCRIBE, WAKE, WAIT = "describe", "wake", "wait"
_FAILED = object()


def recover(uid: str, exc: ZinferError, attempt: int, field: str):
    """The one wake -> wait -> retry -> explain policy for a request to model `uid` that failed with `exc` on its
    `attempt`-th try (0-based), without I/O: a generator of steps (DESCRIBE, WAKE, WAIT) that the sync client and
    the gateway each perform (drive() and the gateway's own loop), returning None to send the request again (its
    instance was unloaded and has been loaded on request) or the error to raise (NoRoute explained by the
    instance's state). A started stream passes attempt=WAKES: never retried, only explained."""
    view: Any = None
    described = False
    if attempt < WAKES and could_be_unloaded(exc):
        view, described = (yield from _describe()), True
        if view is not _FAILED and wakeable(view):
            yield WAKE
            yield WAIT
            return None
    if not isinstance(exc, NoRoute):
        return exc
    if not described:
        view = yield from _describe()
    return exc if view is _FAILED else not_serving(uid, exc, view, field)


def _describe():
    try:
        return (yield DESCRIBE)
    except NotFound:  # no such uid: said by not_serving
        return None
    except ZinferError:  # the scheduler cannot say now: the request's own error stands
        return _FAILED


def _feed(steps, step: str, result, error: ZinferError | None):
    """Hand one step's outcome to recover()'s steps; the next step (StopIteration: the policy's answer). An error
    of DESCRIBE goes back into the policy; one of WAKE or WAIT (the load on request failed) is the request's."""
    if error is None:
        return steps.send(result)
    if step != DESCRIBE:
        raise error
    return steps.throw(error)


def drive(steps, perform) -> ZinferError | None:
    """Run recover()'s steps with `perform(step)` (blocking); its result."""
    try:
        step = next(steps)
        while True:
            try:
                result, error = perform(step), None
            except ZinferError as exc:
                result, error = None, exc
            step = _feed(steps, step, result, error)
    except StopIteration as done:
        return done.value


async def adrive(steps, perform) -> ZinferError | None:
    """drive() for an asyncio caller (the gateway): `perform(step)` is a coroutine function."""
    try:
        step = next(steps)
        while True:
            try:
                result, error = await perform(step), None
            except ZinferError as exc:
                result, error = None, exc
            step = _feed(steps, step, result, error)
    except StopIteration as done:
        return done.value


def embedding_array(reply: p.Embedding, buffers: list) -> np.ndarray:
    """The float32 rows an Embedding reply carries in its buffer (zero-copy)."""
    import numpy as np  # here, not at the top: the CLI's commands that embed nothing start without numpy

    frame = buffers[0]
    return np.frombuffer(frame if type(frame) is bytes else frame.buffer,
                         dtype=np.float32).reshape(reply.rows, reply.dimensions)


def embedding_result(uid: str, reply: p.Embedding, vectors: np.ndarray, encoding: str = "float") -> dict:
    """OpenAI's (and Xinference's) embeddings response; base64 is the float32 bytes of each row."""
    if encoding == "base64":
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(row.tobytes()).decode()}
                for i, row in enumerate(vectors)]
    else:
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(vectors.tolist())]
    return {"object": "list", "model": uid, "data": data,
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}}


def rerank_result(reply: p.RerankResult, documents: list[str], return_documents: bool = False,
                  return_len: bool = False) -> dict:
    """Xinference's rerank response (Cohere's shape, which Jina's clients read too): results best first, each
    with its document's text when asked; meta.tokens when return_len; Jina's model and usage besides."""
    results = [{"index": item.index, "relevance_score": item.relevance_score,
                "document": {"text": documents[item.index]} if return_documents else None}
               for item in reply.results]
    tokens = {"input_tokens": reply.input_tokens, "output_tokens": reply.input_tokens} if return_len else None
    return {"id": str(uuid.uuid4()), "model": reply.model, "results": results,
            "meta": {"api_version": None, "billed_units": None, "tokens": tokens, "warnings": None},
            "usage": {"prompt_tokens": reply.input_tokens, "total_tokens": reply.input_tokens}}

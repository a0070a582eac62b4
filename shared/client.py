"""The public Python API: `Client(endpoint)` talks to the mesh through the broker.

A Client is thread-safe: each thread that uses it gets its own DEALER socket (ZeroMQ sockets are not
thread-safe, sockets are cheap). Every call takes a `timeout` in seconds; errors from the services raise the
typed exceptions of `shared.errors` (InvalidRequest, NotFound, Conflict, Unavailable, RequestTimeout, ...).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from zinfer.shared import compat, keys, wire
from zinfer.shared import protocol as p
from zinfer.shared.buscore import (
    CONNECT_TIMEOUT,
    LAUNCH_POLL_S,
    MONITOR_EVENTS,
    MonitorState,
    Requests,
    as_plain,
    close_connection,
    launch_done,
    read_reply,
    stream_step,
    view_plain,
)
from zinfer.shared.config import Settings, load_settings
from zinfer.shared.errors import RequestTimeout, Unavailable
from zinfer.shared.handles import AudioHandle, EmbeddingHandle, LLMHandle, RerankHandle
from zinfer.shared.transport import send_frames

__all__ = ["Client", "as_plain"]
# While waiting for a reply the client looks at its connection's events this often: a broker that dies
# (its connection closes) fails the pending call within this, not at the call's timeout.
WATCH_S = 0.25
_recv = zmq.backend.Socket.recv  # the sugar layer's per-call checks cost more than the recv itself
_get = zmq.backend.Socket.get
_RCVMORE = zmq.RCVMORE
_monitor_ids = itertools.count()


class _Connection:
    """One thread's DEALER to the broker, with a monitor that tells handshake failures and disconnects."""

    __slots__ = ("sock", "monitor", "key", "endpoint", "state", "waiting")

    def __init__(self, sock: zmq.Socket, monitor: zmq.Socket, key: keys.KeyFile, endpoint: str):
        self.sock, self.monitor, self.key, self.endpoint = sock, monitor, key, endpoint
        # The requests in flight on this socket (a stream left open while the thread makes another call): the
        # messages that arrive for one while another is read wait here for it.
        self.waiting: dict[bytes, deque] = {}
        self.state = MonitorState(
            refused=f"the broker at {endpoint} refused key {key.name!r} ({key.path}): it is unknown there or was "
                    "revoked; ask an admin for a key (`zinfer keys create NAME --role user`) and set "
                    "ZINFER_CLIENT_KEY to its file",
            mismatch=f"the secure handshake with {endpoint} failed: the broker key in {key.path} does not belong "
                     "to the broker there (keys of another mesh?)")

    def events(self) -> None:
        """Apply the monitor's queued events (without blocking); a refused key raises."""
        while _get(self.monitor, zmq.EVENTS) & zmq.POLLIN:
            self._apply(recv_monitor_message(self.monitor, zmq.NOBLOCK))

    def wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.events()
        while not self.state.up:
            left = deadline - time.monotonic()
            if left <= 0 or not self.monitor.poll(int(left * 1000) + 1):
                if self.state.up:
                    return
                raise Unavailable(f"no zinfer broker answers at {self.endpoint} (is `zinfer up` running?)")
            self._apply(recv_monitor_message(self.monitor, zmq.NOBLOCK))

    def _apply(self, event: dict) -> None:
        self.state.apply(event["event"])
        if self.state.failure is not None:
            raise self.state.failure

    def close(self) -> None:
        close_connection(self.sock, self.monitor)


class Client:
    def __init__(self, endpoint: str | None = None, timeout: float | None = None,
                 settings: Settings | None = None, key: str | Path | keys.KeyFile | None = None):
        """`key`: a client key file (or a loaded KeyFile); default ZINFER_CLIENT_KEY, the `client_key` setting,
        else this home's admin key, else its user key."""
        self.settings = settings or load_settings(endpoint=endpoint)
        self.endpoint = endpoint or self.settings.endpoint
        self.timeout = timeout if timeout is not None else self.settings.request_timeout
        self.ctx = zmq.Context.instance()
        self._key_arg = key
        self._key: keys.KeyFile | None = None
        self._local = threading.local()
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()
        self._requests = Requests(self.settings.max_message_bytes, self.settings.max_message_mb)

    # ------------------------------------------------------------------ transport

    @property
    def key(self) -> keys.KeyFile:
        if self._key is None:
            if isinstance(self._key_arg, keys.KeyFile):
                self._key = self._key_arg
            else:
                explicit = str(self._key_arg) if self._key_arg else (self.settings.client_key or None)
                self._key = keys.load_client_key(self.settings.home_path, explicit)
        return self._key

    def _connection(self) -> _Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            key = self.key
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a broker that is not there
            sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_message_bytes)
            key.apply(sock)
            monitor = sock.get_monitor_socket(MONITOR_EVENTS, addr=f"inproc://zinfer-client-{os.getpid()}-"
                                                            f"{next(_monitor_ids)}")
            conn = _Connection(sock, monitor, key, self.endpoint)
            try:
                sock.connect(self.endpoint)
                conn.wait_up(CONNECT_TIMEOUT)
            except zmq.ZMQError as exc:
                conn.close()
                raise Unavailable(f"cannot connect to {self.endpoint}: {exc}") from None
            except BaseException:
                conn.close()
                raise
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _socket(self) -> zmq.Socket:
        return self._connection().sock

    def _send(self, target: str | bytes, msg: p.Msg, buffers=()) -> tuple[_Connection, bytes]:
        req_id, frames = self._requests.frames(target, msg, buffers)
        conn = self._connection()
        conn.events()
        if not conn.state.up:  # reconnecting (the broker restarted): give it the connect timeout to come back
            conn.wait_up(CONNECT_TIMEOUT)
        conn.state.lost = False
        try:
            send_frames(conn.sock, frames, zmq.NOBLOCK, copy=not buffers)
        except zmq.Again:
            raise Unavailable(f"the broker at {self.endpoint} is not reachable") from None
        conn.waiting[req_id] = deque()
        return conn, req_id

    def _recv(self, conn: _Connection, req_id: bytes, timeout: float, what: str) -> tuple[bytes, Any, list]:
        early = conn.waiting.get(req_id)
        if early:
            return read_reply(early.popleft())
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._cancel(conn.sock, req_id)
                raise RequestTimeout(f"no reply to {what} within {timeout:g}s")
            frames = self._recv_frames(conn.sock, int(min(left, WATCH_S) * 1000) + 1)
            if frames is None:
                conn.events()
                if conn.state.lost:
                    raise Unavailable(f"lost the connection to the broker at {self.endpoint} while waiting for "
                                      f"the reply to {what}")
                continue
            if len(frames) < 3 or frames[1] != req_id:
                other = conn.waiting.get(frames[1]) if len(frames) >= 3 else None
                if other is not None:  # for another request of this thread's, still open: kept for it
                    other.append(frames)
                continue  # else a late reply to an earlier, abandoned request
            return read_reply(frames)

    @staticmethod
    def _cancel(sock: zmq.Socket, req_id: bytes) -> None:
        """Tell the server to stop working on a request nobody waits for any more (best effort)."""
        try:
            send_frames(sock, wire.client_cancel(req_id), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    @staticmethod
    def _recv_frames(sock: zmq.Socket, timeout_ms: int) -> list | None:
        """One message, or None after timeout_ms. Envelope and body arrive as bytes (cheapest for small
        frames); buffers after them as zero-copy Frames. A blocking recv with RCVTIMEO costs less than poll."""
        if sock.rcvtimeo != timeout_ms:
            sock.rcvtimeo = timeout_ms
        try:
            frames = [_recv(sock)]
        except zmq.Again:
            return None
        while len(frames) < 3 and _get(sock, _RCVMORE):
            frames.append(_recv(sock))
        while _get(sock, _RCVMORE):
            frames.append(_recv(sock, copy=False))
        return frames

    def call(self, target: str | bytes, msg: p.Msg, timeout: float | None = None, buffers=()):
        """One request, one reply (struct); raises the typed error the service answered with."""
        reply, _ = self.call_with_buffers(target, msg, timeout, buffers)
        return reply

    def call_with_buffers(self, target, msg, timeout=None, buffers=()):
        conn, req_id = self._send(target, msg, buffers)
        try:
            _cmd, reply, extra = self._recv(conn, req_id, self.timeout if timeout is None else timeout,
                                            type(msg).__name__)
        finally:
            conn.waiting.pop(req_id, None)
        return reply, extra

    def stream(self, target: str | bytes, msg: p.Msg, timeout: float | None = None) -> Iterator:
        """A streamed reply: yields each chunk; `timeout` bounds the wait for each chunk.

        Closing the iterator early (break, or the generator being dropped) cancels the work on the server.
        """
        wait = self.timeout if timeout is None else timeout
        conn, req_id = self._send(target, msg)
        done = False
        try:
            while not done:
                cmd, reply, _ = self._recv(conn, req_id, wait, type(msg).__name__)
                done, chunk = stream_step(cmd, reply)
                if chunk is not None:
                    yield chunk
        finally:
            conn.waiting.pop(req_id, None)
            if not done:
                self._cancel(conn.sock, req_id)

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ mesh

    def ping(self, target: str = p.REGISTRY, timeout: float | None = None) -> float:
        """Round-trip seconds of a no-op request to `target`."""
        start = time.perf_counter()
        self.call(target, p.Ping(), timeout)
        return time.perf_counter() - start

    def broker_status(self, timeout: float | None = None) -> dict:
        return as_plain(self.call(p.BROKER_TARGET, p.Ping(), timeout))

    def registry_status(self, timeout: float | None = None) -> dict:
        return as_plain(self.call(p.REGISTRY, p.RegistryStatus(), timeout))

    def scheduler_status(self, timeout: float | None = None) -> dict:
        return as_plain(self.call(p.SCHEDULER, p.SchedulerStatus(), timeout))

    # ------------------------------------------------------------------ registry

    def register_model(self, model_type: str, model: str | dict, persist: bool = False, force: bool = False,
                       timeout: float | None = None) -> None:
        """Register a custom model. force=True replaces a custom definition of the same name, in one step, if
        none of its instances is launched."""
        text = model if isinstance(model, str) else json.dumps(model)
        self.call(p.REGISTRY, p.RegisterModel(model_type=model_type, model=text, persist=persist, force=force),
                  timeout)

    def list_model_registrations(self, model_type: str, timeout: float | None = None) -> list[dict]:
        reply = self.call(p.REGISTRY, p.ListRegistrations(model_type=model_type), timeout)
        return [as_plain(item) for item in reply.items]

    def get_model_registration(self, model_type: str, model_name: str, timeout: float | None = None) -> dict:
        reply = self.call(p.REGISTRY, p.GetRegistration(model_type=model_type, model_name=model_name), timeout)
        return reply.definition

    def unregister_model(self, model_type: str, model_name: str, force: bool = False,
                         timeout: float | None = None) -> None:
        self.call(p.REGISTRY, p.UnregisterModel(model_type=model_type, model_name=model_name, force=force),
                  timeout)

    # ------------------------------------------------------------------ scheduler

    def launch_model(self, model_name: str, model_type: str = "LLM", model_format: str | None = None,
                     model_size_in_billions: int | str | None = None, quantization: str | None = None,
                     model_uid: str | None = None, replica: int = 1, n_gpu: int | str | None = "auto",
                     gpu_idx: int | str | list | None = None, devices: str | list[str] | None = None,
                     wait: bool = True, timeout: float | None = None, progress=None, **kwargs) -> str:
        """Launch a registered model; returns its uid. With wait=True (default) returns once it is ready and
        raises with the cause if loading fails. `progress(view_dict)` is called while waiting.

        Takes Xinference's keywords too (model_engine, worker_ip, gpu_idx as 0, "0,1" or [0, 1], ...); any other
        keyword is an engine option (max_batch_size, n_parallel, ...). Unknown names are refused by name."""
        msg = compat.launch_request(model_name, model_type=model_type, model_format=model_format,
                                    model_size_in_billions=model_size_in_billions, quantization=quantization,
                                    model_uid=model_uid, replica=replica, n_gpu=n_gpu, gpu_idx=gpu_idx,
                                    devices=devices, **kwargs)
        uid = self.call(p.SCHEDULER, msg).model_uid
        if wait:
            self.wait_model(uid, timeout if timeout is not None else self.settings.launch_timeout, progress)
        return uid

    def wait_model(self, model_uid: str, timeout: float, progress=None) -> dict:
        """Wait until the model is ready; a launch that failed raises its error with its own type and field."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.call(p.SCHEDULER, p.DescribeModel(model_uid=model_uid)).model
            if progress is not None:
                progress(view_plain(view))
            if launch_done(model_uid, view, time.monotonic() > deadline, timeout):
                return view_plain(view)
            time.sleep(LAUNCH_POLL_S)

    def list_models(self, timeout: float | None = None) -> dict[str, dict]:
        """Launched models keyed by uid (as Xinference's client returns them)."""
        reply = self.call(p.SCHEDULER, p.ListModels(), timeout)
        return {m.model_uid: view_plain(m) for m in reply.models}

    def describe_model(self, model_uid: str, timeout: float | None = None) -> dict:
        return view_plain(self.call(p.SCHEDULER, p.DescribeModel(model_uid=model_uid), timeout).model)

    def terminate_model(self, model_uid: str, timeout: float | None = None) -> None:
        self.call(p.SCHEDULER, p.TerminateModel(model_uid=model_uid), timeout)

    # ------------------------------------------------------------------ LoRA adapters (vLLM's load_lora_adapter)

    def load_lora(self, model_uid: str, lora_name: str, lora_path: str, lora_scale: float = 1.0,
                  timeout: float | None = None) -> None:
        """Load a LoRA adapter (a PEFT folder for transformers, a GGUF LoRA file for llama.cpp, on the worker's
        host, or a Hub id) into a running LLM; requests name it with generate_config lora_name (admin keys)."""
        lora = compat.lora_adapter({"lora_name": lora_name, "local_path": lora_path, "lora_scale": lora_scale})
        self.call(p.SCHEDULER, p.LoadLora(model_uid=model_uid, lora=lora),
                  timeout if timeout is not None else self.settings.launch_timeout)

    def unload_lora(self, model_uid: str, lora_name: str, timeout: float | None = None) -> None:
        self.call(p.SCHEDULER, p.UnloadLora(model_uid=model_uid, lora_name=lora_name), timeout)

    def list_loras(self, model_uid: str, timeout: float | None = None) -> list[dict]:
        """The model's adapters: lora_name, local_path, lora_scale."""
        return self.describe_model(model_uid, timeout).get("loras", [])

    def get_model(self, model_uid: str) -> ModelHandle:
        """A handle for inference: LLMHandle (generate, chat, create_embedding), EmbeddingHandle, RerankHandle or
        AudioHandle (transcriptions, translations)."""
        view = self.describe_model(model_uid)
        cls = {"embedding": EmbeddingHandle, "rerank": RerankHandle, "audio": AudioHandle}.get(view["model_type"],
                                                                                              LLMHandle)
        return cls(self, model_uid)


ModelHandle = Any

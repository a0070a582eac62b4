"""The wire protocol: envelope frames and every message struct. The single source of truth for both.

Frames (ZeroMQ multipart; the broker reads only the envelope, never the body):

    client -> broker   [REQUEST, target, req_id, body, *buffers]
    broker -> peer     [REQUEST, client_id, req_id, body, *buffers]
    peer   -> broker   [PARTIAL|REPLY, client_id, req_id, body, *buffers]
    broker -> client   [PARTIAL|REPLY, req_id, body, *buffers]
    client -> broker   [CANCEL, req_id]                   broker -> peer [CANCEL, client_id, req_id]
    peer   -> broker   [READY, service_name, *uids] | [BIND|UNBIND, uid] | [HEARTBEAT]
    broker -> peer     [HEARTBEAT] | [DISCONNECT]

The first frame is the header: the protocol name and version (PROTO) followed by a one-byte command, so a
reader checks the version and routes with one comparison (one frame fewer per hop than separate frames).
PARTIAL is one chunk of a streamed reply; REPLY ends every request (a
single answer, the stream's last chunk, or an error). The body is a msgpack-encoded struct of the `Request` or
`Reply` tagged union below; `buffers` carry raw arrays (float32 embeddings) without copying.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import Struct

from shared.models import EmbeddingFamily, FieldProblem, LLMFamily, LLMSpec

PROTOCOL_VERSION = 1
PROTO = b"ZINF" + str(PROTOCOL_VERSION).encode()  # b"ZINF1"

READY = PROTO + b"\x01"
BIND = PROTO + b"\x02"
UNBIND = PROTO + b"\x03"
HEARTBEAT = PROTO + b"\x04"
DISCONNECT = PROTO + b"\x05"
REQUEST = PROTO + b"\x10"
CANCEL = PROTO + b"\x11"
PARTIAL = PROTO + b"\x20"
REPLY = PROTO + b"\x21"

BROKER_TARGET = b"broker"  # requests addressed to the broker itself (its status)
REGISTRY = "registry"
SCHEDULER = "scheduler"


def worker_service(worker_id: str) -> str:
    return f"worker/{worker_id}"


def model_target(model_uid: str) -> str:
    """Model uids live in their own namespace, so a uid can never shadow a service name."""
    return f"model/{model_uid}"


class Msg(Struct, tag_field="op", kw_only=True, omit_defaults=True):
    """Base of every message; the class name is the tag."""


# ---------------------------------------------------------------- requests


class Ping(Msg, kw_only=True):
    """A no-op round trip (liveness checks, bus benchmark)."""

    payload: bytes = b""


class RegisterModel(Msg, kw_only=True):
    model_type: str
    model: str  # the user's JSON text, validated by the registry
    persist: bool = False


class ListRegistrations(Msg, kw_only=True):
    model_type: str


class GetRegistration(Msg, kw_only=True):
    model_type: str
    model_name: str


class UnregisterModel(Msg, kw_only=True):
    model_type: str
    model_name: str
    force: bool = False


class RegistryStatus(Msg, kw_only=True):
    pass


EngineValue = str | int | float | bool | None


class LaunchModel(Msg, kw_only=True):
    model_name: str
    model_type: str = "LLM"
    model_format: str | None = None
    model_size_in_billions: int | str | None = None
    quantization: str | None = None
    model_uid: str | None = None
    replica: int = 1
    n_gpu: int | str | None = "auto"
    gpu_idx: list[int] | None = None
    devices: list[str] | None = None  # pin to these workers by device name (e.g. ["cpu:1"])
    engine_kwargs: dict[str, EngineValue] = {}


class ListModels(Msg, kw_only=True):
    pass


class DescribeModel(Msg, kw_only=True):
    model_uid: str


class TerminateModel(Msg, kw_only=True):
    model_uid: str


class InstancesOf(Msg, kw_only=True):
    """Registry -> scheduler: the launched uids of one registered model (before unregistering it)."""

    model_type: str
    model_name: str


class SchedulerStatus(Msg, kw_only=True):
    pass


class DeviceInfo(Struct, kw_only=True, omit_defaults=True):
    worker_id: str  # e.g. "cpu", "cpu:1", "cuda:0"
    host: str
    device: str  # "cpu" or "cuda:N"
    total_memory: int  # bytes
    free_memory: int  # bytes available to new instances
    gpu_name: str = ""
    pid: int = 0


class InstanceReport(Struct, kw_only=True, omit_defaults=True):
    """What a worker says of one instance it holds; workers are the source of truth for what is loaded."""

    model_uid: str
    replica: int = 0
    model_name: str
    model_type: str
    model_format: str = ""
    model_size_in_billions: int | str | None = None
    quantization: str = ""
    state: str  # launching | ready | failed | terminating
    error: str = ""
    progress: float = 0.0
    memory: int = 0  # bytes this instance holds (estimate on CPU)
    queue_depth: int = 0
    inflight: int = 0


class WorkerReport(Msg, kw_only=True):
    device: DeviceInfo
    instances: list[InstanceReport] = []


class LoadInstance(Msg, kw_only=True):
    """Scheduler -> worker: load one replica of a model. The reply comes when it is ready (or failed)."""

    model_uid: str
    replica: int = 0
    model_type: str
    llm: LLMFamily | None = None
    spec: LLMSpec | None = None
    quantization: str | None = None
    embedding: EmbeddingFamily | None = None
    memory_estimate: int = 0
    engine_kwargs: dict[str, EngineValue] = {}


class UnloadInstance(Msg, kw_only=True):
    model_uid: str


class GenerateConfig(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False
    repetition_penalty: float | None = None
    # How long a stream may gather tokens into one chunk (ms); 0 sends every token as it comes.
    stream_interval_ms: float | None = None


class ChatMessage(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    role: str
    content: str
    name: str | None = None


class Generate(Msg, kw_only=True):
    model_uid: str
    prompt: str
    config: GenerateConfig = msgspec.field(default_factory=GenerateConfig)


class Chat(Msg, kw_only=True):
    model_uid: str
    messages: list[ChatMessage]
    config: GenerateConfig = msgspec.field(default_factory=GenerateConfig)


class Embed(Msg, kw_only=True):
    model_uid: str
    input: list[str]


Request = (
    Ping | RegisterModel | ListRegistrations | GetRegistration | UnregisterModel | RegistryStatus
    | LaunchModel | ListModels | DescribeModel | TerminateModel | InstancesOf | SchedulerStatus | WorkerReport
    | LoadInstance | UnloadInstance | Generate | Chat | Embed
)

# ---------------------------------------------------------------- replies

ErrorCode = Literal[
    "invalid",  # bad input; `field` / `problems` say where
    "not_found",
    "conflict",  # already exists, in use
    "state",  # an instance that is not ready
    "too_large",
    "unavailable",  # nobody serves that target, or its process died
    "timeout",
    "cancelled",
    "protocol",
    "internal",
]


class Error(Msg, kw_only=True):
    code: ErrorCode
    message: str
    field: str | None = None
    problems: list[FieldProblem] = []


class Pong(Msg, kw_only=True):
    payload: bytes = b""


class Ok(Msg, kw_only=True):
    message: str = ""


class RegistrationSummary(Struct, kw_only=True, omit_defaults=True):
    model_type: str
    model_name: str
    is_builtin: bool
    model_format: list[str] = []
    model_ability: list[str] = []
    model_family: str | None = None


class Registrations(Msg, kw_only=True):
    items: list[RegistrationSummary]


class Registration(Msg, kw_only=True):
    model_type: str
    is_builtin: bool
    definition: dict[str, Any]


class CorruptFile(Struct, kw_only=True):
    path: str
    error: str


class RegistryStatusReply(Msg, kw_only=True):
    builtin: dict[str, int]
    custom: dict[str, int]
    corrupt: list[CorruptFile] = []


class Launched(Msg, kw_only=True):
    model_uid: str


class InstanceView(Struct, kw_only=True, omit_defaults=True):
    """One launched model (all its replicas) as `zinfer list` shows it."""

    model_uid: str
    model_name: str
    model_type: str
    model_format: str = ""
    model_size_in_billions: int | str | None = None
    quantization: str = ""
    replica: int = 1
    devices: list[str] = []
    address: list[str] = []
    state: str
    error: str = ""
    progress: float = 0.0
    memory: int = 0
    queue_depth: int = 0
    inflight: int = 0


class ModelList(Msg, kw_only=True):
    models: list[InstanceView]


class ModelDescription(Msg, kw_only=True):
    model: InstanceView


class UidList(Msg, kw_only=True):
    model_uids: list[str]


class SchedulerStatusReply(Msg, kw_only=True):
    workers: list[DeviceInfo]
    instances: int = 0


class PeerView(Struct, kw_only=True, omit_defaults=True):
    service: str
    uids: list[str] = []
    inflight: int = 0
    idle_s: float = 0.0


class BrokerStatusReply(Msg, kw_only=True):
    endpoint: str
    peers: list[PeerView]
    pending: int = 0


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(Struct, kw_only=True):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: str | None = None


class Completion(Msg, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatCompletionMessage(Struct, kw_only=True, omit_defaults=True):
    role: str | None = "assistant"
    content: str | None = None


class ChatChoice(Struct, kw_only=True):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: str | None = None


class ChatDeltaChoice(Struct, kw_only=True):
    index: int = 0
    delta: ChatCompletionMessage
    finish_reason: str | None = None


class ChatCompletion(Msg, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatCompletionChunk(Msg, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatDeltaChoice]
    usage: Usage | None = None


class Embedding(Msg, kw_only=True):
    """Embeddings travel as one raw float32 frame (rows x dimensions) after the body, not as lists."""

    model: str
    rows: int
    dimensions: int
    prompt_tokens: int


Reply = (
    Error | Pong | Ok | Registrations | Registration | RegistryStatusReply | Launched | ModelList
    | ModelDescription | UidList | SchedulerStatusReply | BrokerStatusReply | Completion | ChatCompletion
    | ChatCompletionChunk | Embedding
)

# Which reply each request expects (besides Error); a test keeps this table and the unions in step.
REPLY_OF: dict[type, tuple[type, ...]] = {
    Ping: (Pong,),
    RegisterModel: (Ok,),
    ListRegistrations: (Registrations,),
    GetRegistration: (Registration,),
    UnregisterModel: (Ok,),
    RegistryStatus: (RegistryStatusReply,),
    LaunchModel: (Launched,),
    ListModels: (ModelList,),
    DescribeModel: (ModelDescription,),
    TerminateModel: (Ok,),
    InstancesOf: (UidList,),
    SchedulerStatus: (SchedulerStatusReply,),
    WorkerReport: (Ok,),
    LoadInstance: (Ok,),
    UnloadInstance: (Ok,),
    Generate: (Completion,),
    Chat: (ChatCompletion, ChatCompletionChunk),
    Embed: (Embedding,),
}

# ---------------------------------------------------------------- codec

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode_request(body: bytes | memoryview) -> Request:
    return _request_decoder.decode(body)


def decode_reply(body: bytes | memoryview) -> Reply:
    return _reply_decoder.decode(body)


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    return _encoder.encode(Error(code=code, message=message, field=field))


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

"""The wire protocol: envelope frames and every message struct. The single source of truth for both.

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
or an error). The body is a msgpack-encoded struct of the `Request` or `Reply` tagged union below; `buffers`
carry raw arrays (float32 embeddings) without copying.

`caller` is stamped by the broker from the sender's authenticated CURVE key: "<role> <principal>", where the
principal is the key's name, or the service name of a registered peer (services send their own requests over
the socket they registered with, so a worker can tell the scheduler from any other key). Clients cannot forge
it: the broker writes it. Services check it against ALLOWED_ROLES before a handler runs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from msgspec import Meta, Struct
from zinfer.shared.models import EmbeddingFamily, FieldProblem, LLMFamily, LLMSpec

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

BROKER_TARGET = b"broker"  # requests addressed to the broker itself (its status)
REGISTRY = "registry"
SCHEDULER = "scheduler"


# ---------------------------------------------------------------- callers and roles

USER, ADMIN, SERVICE = "user", "admin", "service"
ROLES = (USER, ADMIN, SERVICE)


class Caller(NamedTuple):
    """Who sent a request, as the broker authenticated it."""

    role: str
    principal: str  # a key's name, or the service name of a registered peer ("scheduler", "worker/cpu")

    def __str__(self) -> str:
        return f"{self.role} {self.principal}"


def caller_stamp(role: str, principal: str) -> bytes:
    return f"{role} {principal}".encode()


def parse_caller(frame: bytes) -> Caller:
    role, _, principal = frame.decode("utf-8", "replace").partition(" ")
    return Caller(role, principal)


def worker_service(worker_id: str) -> str:
    return f"worker/{worker_id}"


INSTANCE_MARK = "#"  # never in a worker id (`zinfer worker --name` refuses it) nor in a model uid


def instance_service(worker_id: str, model_uid: str, replica: int) -> str:
    """The name a model instance's own process registers under: within its worker's name, so a worker host's
    key (which may hold `worker/*`) covers its instances: worker/cpu#my-model/0."""
    return f"{worker_service(worker_id)}{INSTANCE_MARK}{model_uid}/{replica}"


def is_instance_service(service: str) -> bool:
    return service.startswith("worker/") and INSTANCE_MARK in service


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
    force: bool = False  # replace a custom definition of that name (none of its instances may be running)


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


class EngineOptions(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """The launch options an engine takes (Xinference passes them as extra launch keyword arguments). Unknown
    names are refused; none of them loads code. `trust_remote_code` is honoured only for models an operator
    lists in the `trust_remote_code_models` setting."""

    trust_remote_code: bool | None = None
    # requests one instance holds (queued and running) before it answers queue_full (Xinference's
    # request_limits; default: the worker's instance_queue setting)
    request_limits: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    # generation: decode concurrent requests together (default on; off runs them one at a time, in order)
    continuous_batching: bool | None = None
    # transformers: sequences decoded together (default 64)
    max_sequences: Annotated[int, Meta(ge=1, le=4096)] | None = None
    # llama.cpp: context window of each sequence (default: the registration's context_length), CPU threads,
    # and sequences decoded together (default: what 512 MiB of KV cache holds, <= 16)
    n_ctx: Annotated[int, Meta(ge=16, le=1 << 20)] | None = None
    n_threads: Annotated[int, Meta(ge=1, le=1024)] | None = None
    n_parallel: Annotated[int, Meta(ge=1, le=256)] | None = None
    # embeddings: texts and padded tokens per batch, and how long a batch may wait for more requests
    batch_wait_ms: Annotated[float, Meta(ge=0, le=1000)] | None = None
    max_batch_size: Annotated[int, Meta(ge=1, le=65536)] | None = None
    max_batch_tokens: Annotated[int, Meta(ge=1)] | None = None


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
    model_engine: str | None = None  # Xinference's name for the engine; checked against the format
    worker_ip: list[str] | None = None  # pin to workers on these hosts (address or host name)


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
    worker_id: str  # e.g. "cpu", "cpu:1", "cuda:0"; "gpu-host-2/cuda:0" for a worker on another host
    host: str  # its host name
    address: str = ""  # the address it reaches the broker from (what Xinference calls worker_ip)
    device: str  # "cpu" or "cuda:N"
    total_memory: int  # bytes
    free_memory: int  # bytes available to new instances
    gpu_name: str = ""
    pid: int = 0


# An instance replica's life: launching (its first load), ready, restarting (its process died, or its worker
# restarted, and a new process is loading it again), failed (for good, until terminated), terminating.
InstanceState = Literal["launching", "ready", "restarting", "failed", "terminating"]


class InstanceReport(Struct, kw_only=True, omit_defaults=True):
    """What a worker says of one instance it holds; workers are the source of truth for what is loaded."""

    model_uid: str
    replica: int = 0
    incarnation: int = 0  # the launch this replica belongs to (LoadInstance.incarnation)
    model_name: str
    model_type: str
    model_format: str = ""
    model_size_in_billions: int | str | None = None
    quantization: str = ""
    model_ability: list[str] = []
    context_length: int = 0
    state: InstanceState
    error: str = ""
    error_code: str = ""  # the error's wire code (ErrorCode), so that clients raise its type
    error_field: str | None = None
    progress: float = 0.0
    stage: str = ""  # what a launching instance is doing ("loading 1 file, 12 MiB")
    memory: int = 0  # bytes this instance holds: its process's RSS on the CPU, its CUDA memory on a GPU
    queue_depth: int = 0
    inflight: int = 0
    stats: InstanceStats | None = None
    pid: int = 0  # its process (0 while none runs)
    restarts: int = 0  # times its process was started again (after a crash, a kill, or its worker's restart)
    cause: str = ""  # why it last restarted: the signal or exit code, and the last native frame


class InstanceStats(Struct, kw_only=True, omit_defaults=True):
    """Counters since an instance was loaded (what /metrics and the tests read)."""

    requests: int = 0  # requests taken (started)
    failures: int = 0  # requests that ended with an error (cancellations not counted)
    cancelled: int = 0
    tokens_in: int = 0  # prompt tokens (generation) or input tokens (embeddings)
    tokens_out: int = 0  # generated tokens


class WorkerReport(Msg, kw_only=True):
    device: DeviceInfo
    instances: list[InstanceReport] = []


class LoadInstance(Msg, kw_only=True):
    """Scheduler -> worker: load one replica of a model. The reply comes when it is ready (or failed)."""

    model_uid: str
    replica: int = 0
    # Each launch of a uid has its own number: messages about an older launch never touch a newer one.
    incarnation: int = 0
    # Set when the scheduler loads a replica again (its worker restarted, or it moves to another worker): why.
    # The replica shows `restarting` with this cause, not `launching`.
    restore_cause: str = ""
    model_type: str
    llm: LLMFamily | None = None
    spec: LLMSpec | None = None
    quantization: str | None = None
    embedding: EmbeddingFamily | None = None
    memory_estimate: int = 0
    options: EngineOptions = msgspec.field(default_factory=EngineOptions)


class UnloadInstance(Msg, kw_only=True):
    model_uid: str
    incarnation: int = 0  # only this launch's replicas (0: whatever the worker holds of the uid)
    replica: int | None = None  # only this replica (None: every replica of the uid on this worker)


class ProbeFiles(Msg, kw_only=True):
    """Scheduler -> worker, before placing: are this spec's files on your host, and how big are they?"""

    model_type: str
    spec: LLMSpec | None = None
    quantization: str | None = None
    embedding: EmbeddingFamily | None = None


class FindPaths(Msg, kw_only=True):
    """Registry -> scheduler -> every worker: which hosts have these folders / files? (A model_uri is resolved on
    the worker's host: the registry's own host need not have it.)"""

    dirs: list[str] = []
    files: list[str] = []


class ResponseFormat(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema (llama.cpp: a grammar)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None  # OpenAI: {"name": ..., "schema": {...}, "strict": ...}
    schema: dict[str, Any] | None = None  # the schema itself (vLLM's and llama.cpp's spelling)


class StreamOptions(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    include_usage: bool = False


class GenerateConfig(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False
    repetition_penalty: Annotated[float, Meta(gt=0)] | None = None
    # How long a stream may gather tokens into one chunk (ms); 0 sends every token as it comes.
    stream_interval_ms: Annotated[float, Meta(ge=0)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    n: Annotated[int, Meta(ge=1, le=16)] = 1  # choices, each its own sequence
    # Completions: how many top alternatives each token's logprob comes with (0-20). Chat: true/false, with
    # top_logprobs for the alternatives.
    logprobs: bool | Annotated[int, Meta(ge=0, le=20)] | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False  # completions: the prompt comes first in the text
    min_tokens: Annotated[int, Meta(ge=0)] | None = None  # no end token before this many
    ignore_eos: bool = False  # go on past end tokens (to max_tokens or a stop word)
    response_format: ResponseFormat | None = None
    stream_options: StreamOptions | None = None


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
    | LoadInstance | UnloadInstance | ProbeFiles | FindPaths | Generate | Chat | Embed
)

# ---------------------------------------------------------------- replies

ErrorCode = Literal[
    "invalid",  # bad input; `field` / `problems` say where
    "not_found",
    "conflict",  # already exists, in use
    "state",  # an instance that is not ready
    "too_large",
    "unavailable",  # the process serving it died, or the connection to it is gone
    "no_route",  # nothing serves that target (no such service or model uid is running)
    "queue_full",  # a queue on the way is full: try again later
    "timeout",
    "cancelled",
    "protocol",
    "storage",  # the server's own files: disk full, read-only
    "forbidden",  # the caller's role may not do this
    "unauthenticated",  # no usable key, or the key was refused
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
    model_lang: list[str] = []  # LLM model_lang, embedding language
    dimensions: int | None = None  # embedding
    max_tokens: int | None = None  # embedding
    context_length: int | None = None  # LLM


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
    model_ability: list[str] = []
    context_length: int = 0
    replica: int = 1
    devices: list[str] = []  # the worker of each replica
    hosts: list[str] = []  # the host name of each replica's worker
    address: list[str] = []  # "ADDRESS/worker/ID" of each replica (Xinference's address: where it runs)
    state: str
    error: str = ""
    error_code: str = ""
    error_field: str | None = None
    progress: float = 0.0
    stage: str = ""  # what a launching replica is doing (the first one's, while any is launching)
    memory: int = 0
    queue_depth: int = 0
    inflight: int = 0
    stats: InstanceStats = msgspec.field(default_factory=lambda: InstanceStats())
    pids: list[int] = []  # the process of each replica (0 while none runs)
    restarts: int = 0  # restarts of its replicas' processes since the launch
    restart_cause: str = ""  # why the last one restarted


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
    key: str = ""  # the name of the key it registered with


class BrokerStatusReply(Msg, kw_only=True):
    endpoint: str
    peers: list[PeerView]
    pending: int = 0
    parked: int = 0  # requests waiting for a target nobody serves yet
    pid: int = 0


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Struct, kw_only=True):
    """OpenAI's completions logprobs: per token its text, its logprob, the top alternatives, its text offset."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(Struct, kw_only=True):
    """OpenAI's chat logprobs."""

    content: list[TokenLogprob] | None = None


class CompletionChoice(Struct, kw_only=True):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatDeltaChoice(Struct, kw_only=True):
    index: int = 0
    delta: ChatCompletionMessage
    logprobs: ChatLogprobs | None = None
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


class PathsFound(Msg, kw_only=True):
    """For FindPaths: each path found -> the hosts that have it (a folder as a folder, a file as a file), and
    the hosts that were asked."""

    found: dict[str, list[str]] = {}
    hosts: list[str] = []


class FileProbe(Msg, kw_only=True):
    """What a worker found: the files are here (`path`, `size` bytes; 0 when they come from the Hub at load), or
    the `problem`, with the `field` it concerns."""

    ok: bool
    path: str = ""
    size: int = 0
    memory: int = 0  # bytes one instance needs on that worker's device
    problem: str = ""
    code: str = ""
    field: str | None = None
    host: str = ""


class Embedding(Msg, kw_only=True):
    """Embeddings travel as one raw float32 frame (rows x dimensions) after the body, not as lists."""

    model: str
    rows: int
    dimensions: int
    prompt_tokens: int


Reply = (
    Error | Pong | Ok | Registrations | Registration | RegistryStatusReply | Launched | ModelList
    | ModelDescription | UidList | SchedulerStatusReply | BrokerStatusReply | Completion | ChatCompletion
    | ChatCompletionChunk | Embedding | FileProbe | PathsFound
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
    ProbeFiles: (FileProbe,),
    FindPaths: (PathsFound,),
    Generate: (Completion,),
    Chat: (ChatCompletion, ChatCompletionChunk),
    Embed: (Embedding,),
}

# Which roles may send each request; services check it (with the broker's caller stamp) before any handler
# runs. A test keeps it complete. Handlers narrow further where a role is not enough: workers take
# LoadInstance/UnloadInstance from the scheduler only, the scheduler takes a WorkerReport only from that worker.
ANYONE = frozenset(ROLES)
ADMINS = frozenset({ADMIN})
SERVICES = frozenset({SERVICE})
ALLOWED_ROLES: dict[type, frozenset[str]] = {
    Ping: ANYONE,
    RegisterModel: ADMINS,
    ListRegistrations: ANYONE,
    GetRegistration: ANYONE,
    UnregisterModel: ADMINS,
    RegistryStatus: ANYONE,
    LaunchModel: ADMINS,
    ListModels: ANYONE,
    DescribeModel: ANYONE,
    TerminateModel: ADMINS,
    InstancesOf: ANYONE,
    SchedulerStatus: ANYONE,
    WorkerReport: SERVICES,
    LoadInstance: SERVICES,
    UnloadInstance: SERVICES,
    ProbeFiles: SERVICES,
    FindPaths: SERVICES,
    Generate: ANYONE,
    Chat: ANYONE,
    Embed: ANYONE,
}

# ---------------------------------------------------------------- codec

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


class Undecodable(ValueError):
    """A body that is not a valid message: bad msgpack, wrong types, or hostile nesting."""


def decode_request(body: bytes | memoryview) -> Request:
    try:
        return _request_decoder.decode(body)
    except Exception as exc:  # DecodeError, ValidationError, and RecursionError from deeply nested input
        raise Undecodable(_why(exc)) from None


def decode_reply(body: bytes | memoryview) -> Reply:
    try:
        return _reply_decoder.decode(body)
    except Exception as exc:
        raise Undecodable(_why(exc)) from None


def _why(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


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

"""Every message struct on the bus (one tagged union of requests, one of replies), which roles may send each
request, and the codec. The single source of truth for bodies; shared/wire.py builds the frames around them,
shared/payloads.py holds the OpenAI-shaped parts of generate, chat and embed, shared/instances.py the state of
devices and instances, shared/message.py the base struct and the error reply.

`caller` is stamped by the broker from the sender's authenticated CURVE key: "<role> <principal>", where the
principal is the key's name, or the service name of a registered peer (services send their own requests over
the socket they registered with, so a worker can tell the scheduler from any other key). Clients cannot forge
it: the broker writes it. Services check it against ALLOWED_ROLES before a handler runs.
"""

from __future__ import annotations

import typing
from typing import Any, Literal, NamedTuple

import msgspec
from msgspec import Struct

from zinfer.shared.instances import DeviceInfo, InstanceReport, InstanceView
from zinfer.shared.message import Error, Msg
from zinfer.shared.models import AudioFamily, EmbeddingFamily, LLMFamily, LLMSpec, ModelType, RerankFamily
from zinfer.shared.payloads import (
    EngineOptions,  # noqa: F401 - part of this module's vocabulary (p.EngineOptions)
    EngineValue,
    LoraAdapter,
    PeftModelConfig,
)
from zinfer.shared.serving import (
    MAX_AUDIO_BYTES,  # noqa: F401 - p.MAX_AUDIO_BYTES
    SPEECH_FORMATS,  # noqa: F401 - p.SPEECH_FORMATS
    Chat,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    Embed,
    Embedding,
    Generate,
    RenderChat,
    RenderedChat,
    Rerank,
    RerankItem,  # noqa: F401 - p.RerankItem
    RerankResult,
    Speak,
    Speech,
    Transcribe,
    Transcription,
)

BROKER_TARGET = b"broker"  # requests addressed to the broker itself (its status)
REGISTRY = "registry"
SCHEDULER = "scheduler"


# ---------------------------------------------------------------- callers and roles

Role = Literal["user", "admin", "service"]  # what a key may do: the one definition (keys.py's files carry one)
ROLES: tuple[str, ...] = typing.get_args(Role)
USER, ADMIN, SERVICE = ROLES


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
    # The scheduler asks for the typed, launch-ready definition (prompt style and chat template resolved).
    resolved: bool = False


class UnregisterModel(Msg, kw_only=True):
    model_type: str
    model_name: str
    force: bool = False


class RegistryStatus(Msg, kw_only=True):
    pass


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
    # Seconds it stays loaded once idle (shared/durations.py): 0 unloads it after each reply, -1 never; None:
    # the keep_alive setting.
    keep_alive: float | None = None
    restore: bool = True  # loaded again when the mesh starts; False: it comes back idle-unloaded
    # Xinference's launch by path: the named model's template, stops and abilities, its weights from this folder
    # or .gguf file on the worker's host (no registration of its own)
    model_path: str | None = None
    peft_model_config: PeftModelConfig | None = None  # LoRA adapters to load with it (CLI: --lora-modules)


class WakeModel(Msg, kw_only=True):
    """Load on request: an idle-unloaded instance (any caller that may send it requests), or a registration with
    no running instance, by name (callers whose role the load_on_request_roles setting names), with the options
    of its last launch. The reply comes at once; the caller waits for `ready` as after a launch. Concurrent
    wakes share one load."""

    model_uid: str | None = None
    model_name: str | None = None


class KeepAlive(Msg, kw_only=True):
    """A request's keep_alive, as Ollama's requests carry it: how long this instance stays loaded once idle from
    now on (-1: for ever). For the roles the keep_alive_roles setting names."""

    model_uid: str
    keep_alive: float


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
    model_type: ModelType
    llm: LLMFamily | None = None
    spec: LLMSpec | None = None
    quantization: str | None = None
    embedding: EmbeddingFamily | None = None
    rerank: RerankFamily | None = None
    audio: AudioFamily | None = None
    memory_estimate: int = 0
    options: EngineOptions = msgspec.field(default_factory=EngineOptions)
    model_path: str = ""  # launched by path (LaunchModel.model_path): shown in the instance's view
    loras: list[LoraAdapter] = []  # its LoRA adapters: at launch, and those loaded since (a restart keeps them)


class LoadLora(Msg, kw_only=True):
    """Admin -> scheduler -> each replica's instance: load a LoRA adapter into a running LLM (no relaunch); its
    launch remembers it, so a restarted or restored instance comes back with it."""
    model_uid: str
    lora: LoraAdapter


class UnloadLora(Msg, kw_only=True):
    """Admin -> scheduler -> each replica: drop an adapter (requests naming it are refused from then on)."""
    model_uid: str
    lora_name: str


class UnloadInstance(Msg, kw_only=True):
    model_uid: str
    incarnation: int = 0  # only this launch's replicas (0: whatever the worker holds of the uid)
    replica: int | None = None  # only this replica (None: every replica of the uid on this worker)


class ProbeFiles(Msg, kw_only=True):
    """Scheduler -> worker, before placing: are this spec's files on your host, and how big are they?"""

    model_type: ModelType
    spec: LLMSpec | None = None
    quantization: str | None = None
    embedding: EmbeddingFamily | None = None
    rerank: RerankFamily | None = None
    audio: AudioFamily | None = None
    read_context: bool = False  # a launch by model_path: say the files' context length (FileProbe.context_length)
    loras: list[LoraAdapter] = []  # the launch's adapters: here, and fitting the model? (their size counts)
    projector: str = ""  # the launch's multimodal projector (beside the model file; its size counts)


class FindPaths(Msg, kw_only=True):
    """Registry -> scheduler -> every worker: which hosts have these folders / files? (A model_uri is resolved on
    the worker's host: the registry's own host need not have it.)"""

    dirs: list[str] = []
    files: list[str] = []


Request = (
    Ping | RegisterModel | ListRegistrations | GetRegistration | UnregisterModel | RegistryStatus
    | LaunchModel | WakeModel | KeepAlive | ListModels | DescribeModel | TerminateModel | InstancesOf
    | SchedulerStatus | WorkerReport
    | LoadInstance | UnloadInstance | ProbeFiles | FindPaths | Generate | Chat | Embed | Rerank | RenderChat
    | LoadLora | UnloadLora | Transcribe | Speak
)

# ---------------------------------------------------------------- replies

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
    model_lang: list[str] = []  # LLM model_lang, embedding and rerank language
    dimensions: int | None = None  # embedding
    max_tokens: int | None = None  # embedding, rerank
    rerank_type: str | None = None  # rerank: normal, LLM-based, ...
    context_length: int | None = None  # LLM


class Registrations(Msg, kw_only=True):
    items: list[RegistrationSummary]


class Registration(Msg, kw_only=True):
    model_type: str
    is_builtin: bool
    definition: dict[str, Any]  # as registered (Xinference's JSON)
    llm: LLMFamily | None = None  # with GetRegistration.resolved: the definition, typed and complete
    embedding: EmbeddingFamily | None = None
    rerank: RerankFamily | None = None
    audio: AudioFamily | None = None


class CorruptFile(Struct, kw_only=True):
    path: str
    error: str


class RegistryStatusReply(Msg, kw_only=True):
    builtin: dict[str, int]
    custom: dict[str, int]
    corrupt: list[CorruptFile] = []


class Launched(Msg, kw_only=True):
    model_uid: str


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
    caller: str = ""  # who asked, as the broker stamps it ("<role> <principal>"): the gateway's /v1/whoami


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
    context_length: int = 0  # with ProbeFiles.read_context: config.json's or the GGUF's (0: they do not say)


Reply = (
    Error | Pong | Ok | Registrations | Registration | RegistryStatusReply | Launched | ModelList
    | ModelDescription | UidList | SchedulerStatusReply | BrokerStatusReply | Completion | ChatCompletion
    | ChatCompletionChunk | Embedding | RerankResult | FileProbe | PathsFound | RenderedChat | Transcription
    | Speech
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
    WakeModel: (Launched,),
    KeepAlive: (Ok,),
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
    Rerank: (RerankResult,),
    RenderChat: (RenderedChat,),
    Transcribe: (Transcription,),
    Speak: (Speech,),
    LoadLora: (Ok,),
    UnloadLora: (Ok,),
}

# Which roles may send each request; services check it (with the broker's caller stamp) before any handler
# runs. A test keeps it complete. Handlers narrow further where a role is not enough: workers take
# LoadInstance/UnloadInstance from the scheduler only, the scheduler takes a WorkerReport only from that worker.
ANYONE = frozenset(ROLES)
ADMINS = frozenset({ADMIN})
SERVICES = frozenset({SERVICE})
ALLOWED_ROLES: dict[type, frozenset[str]] = {
    **dict.fromkeys((RegisterModel, UnregisterModel, LaunchModel, TerminateModel), ADMINS),
    **dict.fromkeys((LoadLora, UnloadLora), ADMINS | SERVICES),  # admin -> scheduler -> instances (from it only)
    **dict.fromkeys((WorkerReport, LoadInstance, UnloadInstance, ProbeFiles, FindPaths), SERVICES),
    # WakeModel: the scheduler also checks load_on_request_roles; KeepAlive: keep_alive_roles
    **dict.fromkeys((Ping, ListRegistrations, GetRegistration, RegistryStatus, WakeModel, KeepAlive, ListModels,
                     DescribeModel, InstancesOf, SchedulerStatus, Generate, Chat, Embed, Rerank, RenderChat,
                     Transcribe, Speak), ANYONE),
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

"""What the mesh knows of devices and model instances: a worker's device, what an instance is and how each replica
is doing (the worker's report), and a launched model as `zinfer list` shows it. Plain structs, carried by the
messages of shared/protocol.py and kept in the scheduler's book."""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import Struct

from zinfer.shared.message import Error
from zinfer.shared.models import ModelType
from zinfer.shared.payloads import LoraAdapter


class DeviceInfo(Struct, kw_only=True, omit_defaults=True):
    worker_id: str  # e.g. "cpu", "cpu:1", "cuda:0"; "gpu-host-2/cuda:0" for a worker on another host
    host: str  # its host name
    address: str = ""  # the address it reaches the broker from (what Xinference calls worker_ip)
    device: str  # "cpu" or "cuda:N"
    total_memory: int  # bytes
    free_memory: int  # bytes available to new instances
    gpu_name: str = ""
    pid: int = 0


# An instance replica's life: launching (its first load, or a load on request), ready, restarting (its process
# died, or its worker restarted, and a new process is loading it again), failed (for good, until terminated),
# terminating, idle-unloaded (idle for its keep_alive, or made room for another: its memory is free, it stays
# launched, and its next request loads it again).


InstanceState = Literal["launching", "ready", "restarting", "failed", "terminating", "idle-unloaded"]


class InstanceStats(Struct, kw_only=True, omit_defaults=True):
    """Counters since an instance was loaded (what /metrics and the tests read)."""

    requests: int = 0  # requests taken (started)
    failures: int = 0  # requests that ended with an error (cancellations not counted)
    cancelled: int = 0
    tokens_in: int = 0  # prompt tokens (generation) or input tokens (embeddings)
    tokens_out: int = 0  # generated tokens
    grammars_compiled: int = 0  # constrained decoding: grammars compiled (a schema seen before compiles nothing)


class InstanceInfo(Struct, kw_only=True, omit_defaults=True):
    """What a launched model is. The same struct in a worker's report, in the scheduler's book (and its launch
    file) and in `zinfer list`; the client shows its fields at the top level, as Xinference's list does."""

    model_name: str
    model_type: ModelType
    model_format: str = ""
    model_size_in_billions: int | str | None = None
    quantization: str = ""
    model_ability: list[str] = []
    context_length: int = 0
    model_path: str = ""  # launched from a folder or file without a registration of its own (model_path)
    loras: list[LoraAdapter] = []  # its LoRA adapters (at launch and loaded since), each request may name one


class ReplicaStatus(Struct, kw_only=True, omit_defaults=True):
    """How one replica is doing, as its process and its worker tell it; the scheduler keeps the last one."""

    state: InstanceState = "launching"
    error: Error | None = None  # set while failed: the error clients raise (its code gives the type)
    progress: float = 0.0
    stage: str = ""  # what a launching instance is doing ("loading 1 file, 12 MiB")
    memory: int = 0  # bytes this instance holds: its process's RSS on the CPU, its CUDA memory on a GPU
    queue_depth: int = 0
    inflight: int = 0
    stats: InstanceStats | None = None
    pid: int = 0  # its process (0 while none runs)
    restarts: int = 0  # times its process was started again (after a crash, a kill, or its worker's restart)
    cause: str = ""  # why it last restarted: the signal or exit code, and the last native frame
    last_active: float = 0.0  # wall-clock time (s) its process last took a request (0: none yet)


class InstanceReport(Struct, kw_only=True, omit_defaults=True):
    """What a worker says of one instance it holds; workers are the source of truth for what is loaded."""

    model_uid: str
    replica: int = 0
    incarnation: int = 0  # the launch this replica belongs to (LoadInstance.incarnation)
    info: InstanceInfo
    status: ReplicaStatus


class InstanceView(Struct, kw_only=True, omit_defaults=True):
    """One launched model (all its replicas) as `zinfer list` shows it."""

    model_uid: str
    info: InstanceInfo
    replica: int = 1
    devices: list[str] = []  # the worker of each replica
    hosts: list[str] = []  # the host name of each replica's worker
    address: list[str] = []  # "ADDRESS/worker/ID" of each replica (Xinference's address: where it runs)
    state: InstanceState
    error: Error | None = None  # the launch's failure, or a failed replica's
    progress: float = 0.0
    stage: str = ""  # what a launching replica is doing (the first one's, while any is launching)
    memory: int = 0
    queue_depth: int = 0
    inflight: int = 0
    stats: InstanceStats = msgspec.field(default_factory=lambda: InstanceStats())
    pids: list[int] = []  # the process of each replica (0 while none runs)
    restarts: int = 0  # restarts of its replicas' processes since the launch
    restart_cause: str = ""  # why the last one restarted
    # Lifecycle (wall-clock seconds): how long it stays loaded once idle (None: for ever), when that runs out
    # (None: never, or not loaded), when it last took a request, when it was unloaded (0: it is not), how many
    # times it was loaded (its launch, then each load on request), and whether a load on request is under way.
    keep_alive: float | None = None
    expires_at: float | None = None
    last_active: float = 0.0
    unloaded_at: float = 0.0
    loads: int = 0
    loading_on_request: bool = False
    restore: bool = True  # loaded again when the mesh starts (else it comes back idle-unloaded)


def info_of(load) -> InstanceInfo:
    """What a launch's instance is (a protocol.LoadInstance): the scheduler's book and the worker's reports both
    take it from here."""
    spec, llm = load.spec, load.llm
    if load.audio is not None:  # audio models: a transformers folder
        return InstanceInfo(model_name=load.audio.model_name, model_type="audio", model_format="pytorch",
                            quantization="none", model_ability=list(load.audio.model_ability),
                            model_path=load.model_path)
    if load.rerank is not None:  # rerank models: pytorch, no quantization
        return InstanceInfo(model_name=load.rerank.model_name, model_type="rerank", model_format="pytorch",
                            quantization="none", model_ability=["rerank"],
                            context_length=load.rerank.max_tokens or 0, model_path=load.model_path)
    if llm is None:  # embedding models: the spec the launch chose (a sentence-transformers folder, or GGUF)
        chosen = load.embedding.spec
        return InstanceInfo(model_name=load.embedding.model_name, model_type=load.model_type,
                            model_format=chosen.model_format, quantization=chosen.quantization,
                            model_ability=["embed"], context_length=load.embedding.max_tokens,
                            model_path=load.model_path)
    return InstanceInfo(model_name=llm.model_name, model_type=load.model_type, model_format=spec.model_format,
                        model_size_in_billions=spec.model_size_in_billions, quantization=load.quantization or "",
                        model_ability=list(llm.model_ability), context_length=load.options.n_ctx or llm.context_length,
                        model_path=load.model_path, loras=list(load.loras))

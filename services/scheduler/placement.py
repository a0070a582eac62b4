"""Placement as pure functions: pick a spec, choose devices (each worker estimates its own need: sizing.py)."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from zinfer.shared.errors import Forbidden, InvalidRequest, NotFound, TooLarge, ZinferError
from zinfer.shared.models import (
    QUANTIZATION_RE,
    EmbeddingFamily,
    EmbeddingSpec,
    LLMFamily,
    LLMSpec,
    RerankFamily,
    RerankSpec,
    size_in_billions,
)


def spec_label(spec: LLMSpec) -> str:
    return f"{spec.model_format} {spec.model_size_in_billions}B [{', '.join(spec.quantizations)}]"


def slots_of(workers: dict, found: dict) -> list[Slot]:
    """Placement candidates: the live workers (the book's WorkerState by id) that answered a file probe
    (FileProbe by worker id); one whose host lacks the files carries the error it gave."""
    from zinfer.shared.errors import error_class

    return [Slot(w.info.worker_id, w.info.device, w.free, found[wid].memory,
                 tuple(h for h in (w.info.host, w.info.address) if h),
                 None if found[wid].ok else error_class(found[wid].code or "not_found")(
                     found[wid].problem, found[wid].field))
            for wid, w in workers.items() if wid in found]


def launch_options(msg, trusted: list[str]):
    """A LaunchModel's engine options, typed (unknown names refused), under the operator's code policy (the
    trust_remote_code_models setting)."""
    from zinfer.shared.compat import engine_options

    options = engine_options(msg.engine_kwargs)
    if options.trust_remote_code and msg.model_name not in trusted:
        raise Forbidden(f"trust_remote_code: model {msg.model_name!r} may not run its own code here; an "
                        "operator allows it per model with trust_remote_code_models in the settings file",
                        field="trust_remote_code")
    return options


def with_projector(options, family, spec, by_path: bool):
    """The launch's options with its multimodal projector settled: the one it names (one of the spec's
    multimodal_projectors; by model_path, any .gguf name beside the file), else the spec's first for a model with
    the vision ability."""
    from zinfer.shared.shape import projector_name_ok

    names, chosen = spec.multimodal_projectors or [], options.multimodal_projector
    if chosen is None:
        if names and "vision" in family.model_ability:
            return msgspec.structs.replace(options, multimodal_projector=names[0])
        return options
    if spec.model_format != "ggufv2":
        raise InvalidRequest(f"multimodal_projector {chosen!r}: projectors are mmproj GGUF files for llama.cpp; "
                             f"this spec is {spec.model_format}", field="multimodal_projector")
    if by_path and not names:
        if not projector_name_ok(chosen):
            raise InvalidRequest(f"multimodal_projector {chosen!r} must be a .gguf file name beside model_path",
                                 field="multimodal_projector")
    elif chosen not in names:
        raise InvalidRequest(f"multimodal_projector {chosen!r} is not one of the spec's multimodal_projectors "
                             f"({', '.join(names) or 'it lists none'})", field="multimodal_projector")
    return options


def launch_loras(msg) -> list:
    """A LaunchModel's LoRA adapters (peft_model_config.lora_list), each name once."""
    loras = (msg.peft_model_config.lora_list or []) if msg.peft_model_config is not None else []
    names = [lora.lora_name for lora in loras]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InvalidRequest(f"peft_model_config: LoRA adapter name {twice[0]!r} is given twice",
                             field="peft_model_config")
    return list(loras)


def _file_quantization(name: str) -> str:
    """A .gguf file named by a launch's model_path, as the quantization of a one-file spec."""
    quant = name[:-len(".gguf")]
    if not QUANTIZATION_RE.fullmatch(quant):
        raise InvalidRequest(f"model_path: the file name {name!r} must be letters, digits, '_', '.' and '-'",
                             field="model_path")
    return quant


def with_path(family, path: str):
    """The named model's definition (its template, stops, abilities) with its weights at `path` instead, on the
    worker's host: Xinference's launch by model_path. A .gguf file runs on llama.cpp, a folder on transformers
    (LLMs), sentence-transformers (embedding, rerank)."""
    if not path.startswith("/"):
        raise InvalidRequest(f"model_path {path!r} must be an absolute path (on the worker's host)", field="model_path")
    path = path.rstrip("/") or "/"
    if isinstance(family, EmbeddingFamily):
        if path.endswith(".gguf"):  # a GGUF embedding model, on llama.cpp
            folder, name = path.rsplit("/", 1)
            spec = EmbeddingSpec(model_format="ggufv2", model_uri=folder or "/", quantization=_file_quantization(name),
                                 model_file_name_template="{quantization}.gguf")
            return msgspec.structs.replace(family, model_uri=spec.model_uri, model_id=None, model_specs=[spec],
                                           version=2)
        return msgspec.structs.replace(family, model_uri=path, model_id=None, model_specs=None, version=1)
    if isinstance(family, RerankFamily):
        return msgspec.structs.replace(family, model_specs=[RerankSpec(model_uri=path)])
    size = family.model_specs[0].model_size_in_billions
    if path.endswith(".gguf"):
        folder, name = path.rsplit("/", 1)
        spec = LLMSpec(model_format="ggufv2", model_size_in_billions=size, quantizations=[_file_quantization(name)],
                       model_uri=folder or "/", model_file_name_template="{quantization}.gguf")
    else:
        spec = LLMSpec(model_format="pytorch", model_size_in_billions=size, quantizations=["none", "4-bit", "8-bit"],
                       model_uri=path)
    return msgspec.structs.replace(family, model_specs=[spec], v2_spec_extras=[])


def choose_embedding(family: EmbeddingFamily, model_format: str | None, quantization: str | None,
                     formats: tuple[str, ...] | None) -> EmbeddingFamily:
    """The embedding definition with the spec that fits the asked format, quantization and engine first (the one
    that runs), its place in the flat fields."""
    specs = family.model_specs or [family.spec]
    for spec in specs:
        if (model_format and spec.model_format != model_format) or (formats and spec.model_format not in formats) \
                or (quantization and spec.quantization != quantization):
            continue
        if spec is specs[0]:
            return family
        return msgspec.structs.replace(family, model_specs=[spec, *(s for s in specs if s is not spec)],
                                       model_id=spec.model_id, model_uri=spec.model_uri,
                                       model_revision=spec.model_revision, model_hub=spec.model_hub)
    have = ", ".join(f"{s.model_format}/{s.quantization}" for s in specs)
    asked = "/".join(x for x in (model_format, quantization) if x) or f"an engine running {', '.join(formats or ())}"
    field = "quantization" if quantization and not model_format else "model_format"
    raise NotFound(f"embedding model {family.model_name!r} has no spec for {asked} (it has {have})", field=field)


def match_spec(family: LLMFamily, model_format: str | None, size: int | str | None,
               quantization: str | None, formats: tuple[str, ...] | None = None) -> tuple[LLMSpec, str]:
    """The first spec that fits the asked format/size/quantization (and engine's formats), and its quantization."""
    for spec in family.model_specs:
        if model_format and spec.model_format != model_format:
            continue
        if formats is not None and spec.model_format not in formats:
            continue
        if size is not None and size_in_billions(spec.model_size_in_billions) != size_in_billions(size):
            continue
        if quantization:
            if quantization not in spec.quantizations:
                continue
            return spec, quantization
        if spec.model_format == "pytorch" and "none" in spec.quantizations:
            return spec, "none"
        return spec, spec.quantizations[0]
    asked = ", ".join(f"{k}={v}" for k, v in (("model_format", model_format), ("size_in_billions", size),
                                               ("quantization", quantization)) if v is not None)
    raise NotFound(f"no spec of {family.model_name!r} matches {asked or 'the request'}; it has: "
                   + "; ".join(spec_label(s) for s in family.model_specs), field="model_format")


@dataclass
class Slot:
    worker_id: str
    device: str  # cpu | cuda:N
    free: int  # bytes free for new instances (reported, less reservations)
    need: int = 0  # bytes one instance needs there (the worker's own estimate, from the files it has)
    hosts: tuple[str, ...] = ()  # its host's name and address (worker_ip pins by either; replicas spread by them)
    problem: ZinferError | None = None  # why it cannot load this model (its host lacks the files), if it cannot

    @property
    def host(self) -> tuple[str, ...]:
        return self.hosts or (self.worker_id,)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def candidates(slots: list[Slot], n_gpu: int | str | None, gpu_idx: list[int] | None,
               devices: list[str] | None = None, worker_ip: list[str] | None = None) -> list[Slot]:
    if worker_ip:
        on_host = [s for s in slots if set(worker_ip) & set(s.hosts)]
        if not on_host:
            have = sorted({h for s in slots for h in s.hosts[:2]}) or ["no workers"]
            raise InvalidRequest(f"worker_ip {worker_ip}: no worker runs there (hosts: {', '.join(have)})",
                                 field="worker_ip")
        slots = on_host
    gpus = [s for s in slots if s.device.startswith("cuda")]
    cpus = [s for s in slots if s.device.startswith("cpu")]
    if devices:
        chosen = [s for s in slots if s.worker_id in devices or s.device in devices]
        missing = set(devices) - {s.worker_id for s in chosen} - {s.device for s in chosen}
        if missing:
            have = sorted(s.worker_id for s in slots) or ["no workers"]
            raise InvalidRequest(f"devices {sorted(missing)}: no such worker (have {', '.join(have)})",
                                 field="devices")
        return chosen
    if gpu_idx:
        wanted = {f"cuda:{i}" for i in gpu_idx}
        chosen = [s for s in gpus if s.device in wanted]
        missing = wanted - {s.device for s in chosen}
        if missing:
            have = sorted(s.device for s in gpus) or ["no GPU workers"]
            raise InvalidRequest(f"gpu_idx {sorted(missing)}: no such GPU worker (have {', '.join(have)})",
                                 field="gpu_idx")
        return chosen
    if n_gpu in (0, "0"):
        return cpus
    if n_gpu in (None, "auto"):
        return gpus or cpus
    try:
        count = int(n_gpu)
    except (TypeError, ValueError):
        raise InvalidRequest(f"n_gpu {n_gpu!r} must be \"auto\" or an integer", field="n_gpu") from None
    if count != 1:
        raise InvalidRequest(f"n_gpu={count}: zinfer places each replica on one device (use replica for more)",
                             field="n_gpu")
    if not gpus:
        raise InvalidRequest("n_gpu=1 but no GPU worker is running", field="n_gpu")
    return gpus


def place(slots: list[Slot], replica: int, n_gpu: int | str | None = "auto", gpu_idx: list[int] | None = None,
          devices: list[str] | None = None, worker_ip: list[str] | None = None) -> list[str]:
    """Worker ids for `replica` instances: on the candidates (pins, n_gpu) whose host has the files, replicas
    spread over distinct hosts first, then distinct devices, most free memory first.

    Each slot says the bytes one instance needs there (`need`), or why it cannot load the model (`problem`: its
    host lacks the files), which is raised when no candidate has them. Raises TooLarge with the numbers when
    some replica fits nowhere (nothing is reserved then).
    """
    pool = candidates(slots, n_gpu, gpu_idx, devices, worker_ip)
    if not pool:
        raise TooLarge("no worker is running for this placement", field="n_gpu")
    lacking = [s for s in pool if s.problem is not None]
    pool = [s for s in pool if s.problem is None]
    if not pool:
        first = lacking[0].problem
        also = f" (and on {len(lacking) - 1} other candidate worker(s))" if len(lacking) > 1 else ""
        raise type(first)(first.message + also, first.field)
    free = {s.worker_id: s.free for s in pool}
    chosen: list[str] = []
    for _ in range(replica):
        fits = [s for s in pool if free[s.worker_id] >= s.need]
        used_hosts = {s.host for s in pool if s.worker_id in chosen}
        new_host = [s for s in fits if s.host not in used_hosts]
        fresh = [s for s in fits if s.worker_id not in chosen]
        options = new_host or fresh or fits
        if not options:
            detail = ", ".join(f"{s.worker_id} needs {_mib(s.need)}, has {_mib(free[s.worker_id])} free" for s in pool)
            placed = f" ({len(chosen)} of {replica} replicas placed)" if replica > 1 else ""
            raise TooLarge(f"not enough memory for this model{placed}: {detail}", field="replica"
                           if chosen else None)
        best = max(options, key=lambda s: free[s.worker_id])
        chosen.append(best.worker_id)
        free[best.worker_id] -= best.need
    return chosen

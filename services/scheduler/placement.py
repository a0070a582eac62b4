"""Placement as pure functions: pick a spec, estimate its memory, choose devices."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from shared.errors import InvalidRequest, NotFound, TooLarge
from shared.models import EmbeddingFamily, LLMFamily, LLMSpec, size_in_billions, spec_file_name, uri_to_path

OVERHEAD = 1.2  # activations, KV cache, allocator slack
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def spec_label(spec: LLMSpec) -> str:
    return f"{spec.model_format} {spec.model_size_in_billions}B [{', '.join(spec.quantizations)}]"


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


def _weights_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def _checkpoint_bytes_per_param(path: Path) -> float:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return 2.0
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float16")
    return 4.0 if "32" in dtype else 2.0


_GGUF_BYTES = {"q2": 0.35, "q3": 0.45, "q4": 0.6, "q5": 0.7, "q6": 0.8, "q8": 1.1, "f16": 2.0, "f32": 4.0}


def estimate_memory(spec: LLMSpec | None, quantization: str | None, embedding: EmbeddingFamily | None,
                    device_kind: str) -> int:
    """Bytes one instance will hold on a device of this kind: from the files on disk, else from parameters."""
    if embedding is not None:
        path = uri_to_path(embedding.model_uri) if embedding.model_uri else None
        if path and os.path.exists(path):
            size = _weights_bytes(Path(path))
            factor = 0.5 if device_kind == "cuda" else 1.0  # fp16 on a GPU
            return int(size * factor * OVERHEAD)
        return 512 * 2**20
    path_str = uri_to_path(spec.model_uri) if spec.model_uri else None
    if path_str and os.path.exists(path_str):
        path = Path(path_str)
        if spec.model_format != "pytorch":
            if path.is_dir():
                path = path / spec_file_name(spec.model_file_name_template, quantization)
            if path.is_file():
                return int(path.stat().st_size * OVERHEAD)
        else:
            stored = _checkpoint_bytes_per_param(path)
            target = 4.0 if device_kind == "cpu" else {"4-bit": 0.55, "8-bit": 1.05}.get(quantization, 2.0)
            return int(_weights_bytes(path) * target / stored * OVERHEAD)
    params = size_in_billions(spec.model_size_in_billions) * 1e9
    if spec.model_format == "pytorch":
        per = 4.0 if device_kind == "cpu" else {"4-bit": 0.55, "8-bit": 1.05}.get(quantization, 2.0)
    else:
        q = (quantization or "").lower()
        per = next((v for k, v in _GGUF_BYTES.items() if q.startswith(k)), 2.0)
    return int(params * per * OVERHEAD)


@dataclass
class Slot:
    worker_id: str
    device: str  # cpu | cuda:N
    free: int  # bytes free for new instances (reported, less reservations)
    hosts: tuple[str, ...] = ()  # the names and addresses of its host (for worker_ip)


# Xinference's engine names, by the formats each runs here.
ENGINES = {"transformers": ("pytorch",), "llama.cpp": ("ggufv2", "ggmlv3"),
           "sentence_transformers": ("embedding",)}
_ENGINE_ALIASES = {"transformers": "transformers", "llama.cpp": "llama.cpp", "llama_cpp": "llama.cpp",
                   "llamacpp": "llama.cpp", "sentence_transformers": "sentence_transformers",
                   "sentence-transformers": "sentence_transformers"}


def engine_formats(model_engine: str | None, model_type: str) -> tuple[str, ...] | None:
    """The formats a requested engine runs (None: any); raises InvalidRequest for an engine zinfer lacks."""
    if model_engine is None:
        return None
    engine = _ENGINE_ALIASES.get(model_engine.strip().lower())
    valid = "sentence_transformers" if model_type == "embedding" else "transformers or llama.cpp"
    if engine is None or (model_type == "embedding") != (engine == "sentence_transformers"):
        raise InvalidRequest(f"model_engine {model_engine!r}: zinfer runs {valid} for {model_type} models",
                             field="model_engine")
    return ENGINES[engine]


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


def place(slots: list[Slot], need: dict[str, int], replica: int, n_gpu: int | str | None = "auto",
          gpu_idx: list[int] | None = None, devices: list[str] | None = None,
          worker_ip: list[str] | None = None) -> list[str]:
    """Worker ids for `replica` instances: most free memory first, distinct devices while they fit.

    `need` maps a device kind ("cpu", "cuda") to the bytes one instance needs there. Raises TooLarge with
    the numbers when some replica fits nowhere (nothing is reserved then).
    """
    pool = candidates(slots, n_gpu, gpu_idx, devices, worker_ip)
    if not pool:
        raise TooLarge("no worker is running for this placement", field="n_gpu")
    free = {s.worker_id: s.free for s in pool}
    chosen: list[str] = []
    for _ in range(replica):
        fits = [s for s in pool if free[s.worker_id] >= need[_kind(s.device)]]
        fresh = [s for s in fits if s.worker_id not in chosen]
        options = fresh or fits
        if not options:
            detail = ", ".join(f"{s.worker_id} needs {_mib(need[_kind(s.device)])}, has {_mib(free[s.worker_id])} "
                               "free" for s in pool)
            placed = f" ({len(chosen)} of {replica} replicas placed)" if replica > 1 else ""
            raise TooLarge(f"not enough memory for this model{placed}: {detail}", field="replica"
                           if chosen else None)
        best = max(options, key=lambda s: free[s.worker_id])
        chosen.append(best.worker_id)
        free[best.worker_id] -= need[_kind(best.device)]
    return chosen


def _kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"

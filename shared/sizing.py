"""How much memory one instance of a model needs on a device: from its files when they are here, else from its
parameter count. Workers answer this for their own host (the files may exist on one host only)."""

from __future__ import annotations

import json
from pathlib import Path

from zinfer.shared import engines
from zinfer.shared.models import AudioFamily, EmbeddingFamily, LLMSpec, RerankFamily, size_in_billions

OVERHEAD = 1.2  # activations, KV cache, allocator slack
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_GGUF_BYTES = {"q2": 0.35, "q3": 0.45, "q4": 0.6, "q5": 0.7, "q6": 0.8, "q8": 1.1, "f16": 2.0, "f32": 4.0}


def weights_bytes(path: Path) -> int:
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


def _checkpoint(spec: LLMSpec, quantization: str | None, device_kind: str, path: str | None) -> int:
    """transformers: the checkpoint's weights converted to the dtype it runs in (float32 on the CPU)."""
    target = 4.0 if device_kind == "cpu" else {"4-bit": 0.55, "8-bit": 1.05}.get(quantization, 2.0)
    if path:
        return int(weights_bytes(Path(path)) * target / _checkpoint_bytes_per_param(Path(path)) * OVERHEAD)
    return int(size_in_billions(spec.model_size_in_billions) * 1e9 * target * OVERHEAD)


def _gguf(spec: LLMSpec, quantization: str | None, device_kind: str, path: str | None) -> int:
    """llama.cpp: the file as it is (mapped), else the parameters at the quantization's bytes per weight."""
    if path:
        return int(Path(path).stat().st_size * OVERHEAD)
    q = (quantization or "").lower()
    per = next((v for k, v in _GGUF_BYTES.items() if q.startswith(k)), 2.0)
    return int(size_in_billions(spec.model_size_in_billions) * 1e9 * per * OVERHEAD)


def _folder(family: EmbeddingFamily | RerankFamily, device_kind: str, path: str | None) -> int:
    """sentence-transformers (embeddings, cross-encoders): its weights (fp16 on a GPU); 512 MiB before its files
    are seen."""
    if path:
        factor = 0.5 if device_kind == "cuda" and Path(path).is_dir() else 1.0  # fp16 on a GPU; a GGUF as it is
        return int(weights_bytes(Path(path)) * factor * OVERHEAD)
    return 512 * 2**20


SIZERS = {"checkpoint": _checkpoint, "gguf": _gguf, "folder": _folder}  # EngineInfo.memory -> its rule


def estimate_memory(spec: LLMSpec | None, quantization: str | None, family: EmbeddingFamily | RerankFamily | None,
                    device_kind: str, path: str | None = None) -> int:
    """Bytes one instance will hold on a device of this kind ("cpu", "cuda"): from its local files at `path` (a
    folder, or the gguf/ggml file), else from its parameters; by the rule of the engine that runs it. `family`:
    an embedding or rerank model (no spec)."""
    if family is not None:
        model_type = "rerank" if isinstance(family, RerankFamily) else "audio" if isinstance(family, AudioFamily) \
            else "embedding"
        engine = engines.for_model(model_type, engines.model_format(model_type, family))
        return SIZERS[engine.memory](family, device_kind, path)
    return SIZERS[engines.for_model("LLM", spec.model_format).memory](spec, quantization, device_kind, path)

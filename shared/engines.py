"""Every engine zinfer runs, in one place: its name (Xinference's) and aliases, the model type and formats it
runs, the launch options only it reads with their defaults, how its files are checked before it sees them, how
its memory is estimated, and where the instance process finds the function that loads it.

Read by placement (which engine runs a launch, which options it may take), by the scheduler's launch checks and
by the instance process (services/worker/instance/instance.py), which imports `loader` only there: this module imports
nothing heavy, so the scheduler never loads torch. Adding an engine is adding its module (a backend with a
`load(instance, path, trust, limit)` function) and one entry here.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

import msgspec

from zinfer.shared.errors import InvalidRequest


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # Xinference's model_engine name
    aliases: tuple[str, ...] = ()  # other spellings a launch may use (lower case)
    model_type: Literal["LLM", "embedding", "rerank", "audio"]
    formats: tuple[str, ...] = ()  # the model_format values it runs (embedding and rerank: pytorch only)
    options: dict[str, Any] = {}  # EngineOptions fields only this engine reads -> default (None: worked out)
    generates: bool = False  # continuous_batching applies
    files: Literal["hf_folder", "gguf"]  # how the files are checked before the engine opens them
    memory: Literal["checkpoint", "gguf", "folder"]  # how one instance's memory is estimated (shared/sizing.py)
    loader: str  # "module:function" that builds (backend, engine) in the instance process


ENGINES: tuple[EngineInfo, ...] = (
    EngineInfo(name="transformers", model_type="LLM", formats=("pytorch",), generates=True, files="hf_folder",
               memory="checkpoint", options={"max_sequences": 64},
               loader="zinfer.services.worker.instance.backends.transformers_backend:load"),
    EngineInfo(name="llama.cpp", aliases=("llama_cpp", "llamacpp"), model_type="LLM", formats=("ggufv2", "ggmlv3"),
               generates=True, files="gguf", memory="gguf",
               # n_ctx: the registration's context_length; n_threads: the instance_threads setting, else
               # llama.cpp's own; n_parallel: what 512 MiB of KV cache holds, at most 16; multimodal_projector:
               # the spec's first projector for a vision model
               options={"n_ctx": None, "n_threads": None, "n_parallel": None, "multimodal_projector": None},
               loader="zinfer.services.worker.instance.backends.llama_cpp_backend:load"),
    EngineInfo(name="sentence_transformers", aliases=("sentence-transformers",), model_type="embedding",
               formats=("pytorch",), files="hf_folder", memory="folder",
               options={"max_batch_size": 256, "max_batch_tokens": 16384, "batch_wait_ms": 0.0},
               loader="zinfer.services.worker.instance.backends.sentence_backend:load"),
    # GGUF embedding models. On a CPU llama.cpp's cost is the tokens' arithmetic (32 texts in one decode cost what
    # they cost one by one) and an encoder attends across its whole step, so steps stay small: 16 texts, 512 tokens.
    EngineInfo(name="llama.cpp", aliases=("llama_cpp", "llamacpp"), model_type="embedding", formats=("ggufv2",),
               files="gguf", memory="folder",
               options={"max_batch_size": 16, "max_batch_tokens": 512, "batch_wait_ms": 0.0, "n_threads": None},
               loader="zinfer.services.worker.instance.backends.llama_embed_backend:load"),
    # Xinference names its rerank engine sentence_transformers too: CrossEncoder for the `normal` type. One step
    # scores at most max_batch_size query-document pairs and max_batch_tokens padded tokens.
    EngineInfo(name="sentence_transformers", aliases=("sentence-transformers",), model_type="rerank",
               files="hf_folder", memory="folder",
               options={"max_batch_size": 256, "max_batch_tokens": 16384, "batch_wait_ms": 0.0},
               loader="zinfer.services.worker.instance.backends.cross_encoder_backend:load"),
    # Speech to text on transformers' speech-recognition pipeline (Whisper-style models): one step runs up to
    # max_batch_size 30-second windows, of one request or several (None: 8 on a GPU; on a CPU 2 to 8, as many as
    # 1 GiB of cross-attention cache holds: speech_backend.default_batch).
    EngineInfo(name="transformers", model_type="audio", formats=("pytorch",), files="hf_folder", memory="folder",
               options={"max_batch_size": None, "batch_wait_ms": 0.0},
               loader="zinfer.services.worker.instance.backends.speech_backend:load"),
)


def by_name(model_engine: str, model_type: str | None = None) -> EngineInfo | None:
    """The engine of this name (or alias) that runs this model type (any type when None)."""
    name = model_engine.strip().lower()
    return next((e for e in ENGINES if name in (e.name, *e.aliases)
                 and (model_type is None or e.model_type == model_type)), None)


def for_model(model_type: str, model_format: str | None) -> EngineInfo:
    """The engine that runs this model type and format (the first listed where several could)."""
    for engine in ENGINES:
        if engine.model_type == model_type and (not engine.formats or model_format in (None, *engine.formats)):
            return engine
    raise InvalidRequest(f"no engine runs {model_type} models in format {model_format!r}", field="model_format")


def model_format(model_type: str, family: Any, spec: Any = None) -> str | None:
    """The format a launch's files come in: its LLM spec's, an embedding model's chosen spec's (rerank: pytorch)."""
    if spec is not None:
        return spec.model_format
    return family.spec.model_format if model_type == "embedding" else None


def of_load(load) -> EngineInfo:
    """The engine that runs a LoadInstance."""
    return for_model(load.model_type, model_format(load.model_type, load.embedding, load.spec))


def formats_of(model_engine: str | None, model_type: str) -> tuple[str, ...] | None:
    """The formats a requested engine runs (None: any engine may); InvalidRequest for an engine zinfer lacks or
    one of another model type."""
    if model_engine is None:
        return None
    engine = by_name(model_engine, model_type)
    if engine is None:
        valid = " or ".join(e.name for e in ENGINES if e.model_type == model_type)
        raise InvalidRequest(f"model_engine {model_engine!r}: zinfer runs {valid} for {model_type} models",
                             field="model_engine")
    return engine.formats or None


def check_options(options, engine: EngineInfo) -> None:
    """Refuse an option the chosen engine would not read (n_ctx for transformers), by name."""
    for other in ENGINES:
        if other is engine or other.name == engine.name:
            continue
        for name in other.options:
            if name not in engine.options and getattr(options, name) is not None:
                raise InvalidRequest(f"{name} is an option of the {other.name} engine; this model runs on "
                                     f"{engine.name}", field=name)
    if not engine.generates and options.continuous_batching is not None:
        raise InvalidRequest(f"continuous_batching is an option of the generation engines; this model runs on "
                             f"{engine.name}", field="continuous_batching")


def option(engine: EngineInfo, options, name: str):
    """A launch's value for one of the engine's options, else the engine's default."""
    value = getattr(options, name)
    return engine.options[name] if value is None else value


def loader(engine: EngineInfo):
    module, _, function = engine.loader.partition(":")
    return getattr(importlib.import_module(module), function)

"""LoRA adapters' files: where an adapter is (a path on this host, or a Hub repository downloaded like a model)
and whether it fits its model, read from file headers only (no weights loaded), so that a worker's probe can
refuse a launch before anything loads and an instance can refuse a run-time load before its engine is touched.

Two kinds, one per engine: a PEFT folder (adapter_config.json with peft_type LORA, adapter_model.safetensors)
for transformers, checked against the model's safetensors headers; a GGUF LoRA file (general.type adapter,
adapter.type lora) for llama.cpp, checked against the model's GGUF tensors. Either way each lora_A must read the
input width of the module it adapts, each lora_B write its output width, and the two share one rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from zinfer.services.worker.files import _from_hub
from zinfer.shared import protocol as p
from zinfer.shared.errors import InvalidRequest, NotFound, ZinferError
from zinfer.shared.payloads import LoraAdapter

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def looks_like_hub_id(path: str) -> bool:
    """`org/name`: a Hub repository rather than a path on this host."""
    parts = path.split("/")
    return not os.path.isabs(path) and len(parts) == 2 and all(parts) and not path.startswith(".")


def local_path(lora: LoraAdapter, field: str) -> str | None:
    """The adapter's path on this host, None for a Hub id not cached here; raises NotFound naming the field when
    it is a path that this host lacks."""
    if os.path.exists(lora.local_path):
        return lora.local_path
    if looks_like_hub_id(lora.local_path):
        return None
    raise NotFound(f"LoRA adapter {lora.lora_name!r}: {lora.local_path!r} does not exist on this host", field=field)


def resolve(lora: LoraAdapter, field: str, fetch=None) -> str:
    """The adapter's files on this host, downloaded from the Hub (with the launch's progress) when it names a
    repository."""
    path = local_path(lora, field)
    if path is not None:
        return path
    try:
        return _from_hub(lora.local_path, None, fetch=fetch)
    except NotFound as exc:
        raise NotFound(f"LoRA adapter {lora.lora_name!r}: {exc.message}", field=field) from None


def probed(msg: p.ProbeFiles, found: p.FileProbe) -> p.FileProbe:
    """A worker's probe of a launch's files with its LoRA adapters': those on this host checked to fit the
    model's files here, their size added to the memory it needs (one from the Hub is checked once downloaded,
    at load). On transformers an adapter's weights are held twice: PEFT's, and their side-by-side copy that
    mixed-adapter batches use (lora_mix.py). A bad adapter makes the probe a refusal naming it."""
    if not msg.loras or not found.ok:
        return found
    copies = 2 if msg.spec.model_format == "pytorch" else 1
    try:
        for lora in msg.loras:
            path = local_path(lora, "peft_model_config")
            if path is not None:
                found.memory += copies * check(lora, path, found.path or None, msg.spec.model_format,
                                               "peft_model_config")
    except ZinferError as exc:
        return p.FileProbe(ok=False, problem=exc.message, code=exc.code, field=exc.field, host=found.host)
    return found


def size_of(path: str) -> int:
    where = Path(path)
    if where.is_file():
        return where.stat().st_size
    return sum(f.stat().st_size for f in where.rglob("*.safetensors") if f.is_file())


def check(lora: LoraAdapter, path: str, model_path: str | None, model_format: str, field: str) -> int:
    """Raise InvalidRequest (naming the adapter and `field`) unless the adapter at `path` is a LoRA adapter of the
    engine's kind that fits the model at `model_path` (None: its files are not here yet; the kind is still
    checked). Returns the adapter's size in bytes."""
    def refuse(problem: str) -> InvalidRequest:
        return InvalidRequest(f"LoRA adapter {lora.lora_name!r} ({lora.local_path}): {problem}", field=field)

    if model_format == "pytorch":
        _check_peft(Path(path), Path(model_path) if model_path else None, refuse)
    elif model_format in ("ggufv2", "ggmlv3"):
        _check_gguf(Path(path), Path(model_path) if model_path and model_format == "ggufv2" else None, refuse)
    else:
        raise refuse(f"model_format {model_format} takes no LoRA adapters")
    return size_of(path)


# ---------------------------------------------------------------------------------------------------- PEFT

def _check_peft(folder: Path, model: Path | None, refuse) -> None:
    if not folder.is_dir():
        raise refuse("the transformers engine takes a PEFT folder (adapter_config.json and "
                     f"{PEFT_WEIGHTS}); this is a file (a GGUF LoRA is for the llama.cpp engine)")
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except FileNotFoundError:
        raise refuse(f"no {PEFT_CONFIG} in the folder: not a PEFT adapter") from None
    except (OSError, ValueError) as exc:
        raise refuse(f"{PEFT_CONFIG} cannot be read: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise refuse(f"{PEFT_CONFIG} says peft_type {config.get('peft_type') if isinstance(config, dict) else None!r};"
                     " zinfer serves LORA adapters")
    if config.get("use_dora"):
        raise refuse("DoRA adapters (use_dora) are not supported")
    weights = folder / PEFT_WEIGHTS
    if not weights.is_file():
        raise refuse(f"no {PEFT_WEIGHTS} in the folder (pickled .bin adapters are not loaded: they can run code)")
    pairs = _peft_pairs(_safetensors_shapes([weights], refuse))
    if not pairs:
        raise refuse(f"{PEFT_WEIGHTS} holds no lora_A / lora_B weights")
    base = _model_shapes(model, refuse) if model is not None else None
    rank = config.get("r") if not config.get("rank_pattern") else None
    for module, ab in sorted(pairs.items()):
        _check_peft_pair(module, ab.get("lora_A"), ab.get("lora_B"), rank, base, refuse)


def _peft_pairs(shapes: dict[str, tuple]) -> dict[str, dict[str, tuple]]:
    """{module: {"lora_A": shape, "lora_B": shape}} of a PEFT adapter's weights."""
    pairs: dict[str, dict[str, tuple]] = {}
    for key, shape in shapes.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                pairs.setdefault(key.split(marker)[0].removeprefix(_PEFT_PREFIX), {})[part] = shape
    return pairs


def _check_peft_pair(module: str, a, b, rank, base: dict | None, refuse) -> None:
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        raise refuse(f"{module}: lora_A and lora_B must both be matrices")
    if a[0] != b[1]:
        raise refuse(f"{module}: lora_A has rank {a[0]} but lora_B rank {b[1]}")
    if rank is not None and a[0] != rank:
        raise refuse(f"{module}: rank {a[0]}, but adapter_config.json says r={rank}")
    if base is None:
        return
    target = base.get(f"{module}.weight")
    if target is None:
        raise refuse(f"the model has no module {module!r} (an adapter for another architecture?)")
    if len(target) != 2 or (target[1], target[0]) != (a[1], b[0]):
        raise refuse(f"{module}: the adapter maps {a[1]} -> {b[0]} features, the model's weight is "
                     f"{list(target)} (an adapter for another model size?)")


def _safetensors_shapes(files: list[Path], refuse) -> dict[str, tuple]:
    from safetensors import safe_open

    out: dict[str, tuple] = {}
    for f in files:
        try:
            with safe_open(str(f), "np") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    out[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as exc:  # a truncated or corrupt file: safetensors' own error says which
            raise refuse(f"{f.name} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return out


def _model_shapes(model: Path, refuse) -> dict[str, tuple]:
    """Every weight's shape in the model folder, by name (a PEFT key less its base_model.model. prefix names the
    same module)."""
    index = model / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(model.glob("*.safetensors"))
    return _safetensors_shapes(files, refuse) if files else {}


# ---------------------------------------------------------------------------------------------------- GGUF

def _gguf(path: Path, refuse, what: str):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:
        raise refuse(f"{what} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def _field(reader, key: str):
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


def _check_gguf(file: Path, model: Path | None, refuse) -> None:
    if not file.is_file():
        raise refuse("the llama.cpp engine takes a GGUF LoRA file; this is a folder (a PEFT adapter is for the "
                     "transformers engine: convert it with llama.cpp's convert_lora_to_gguf.py)")
    reader = _gguf(file, refuse, "the file")
    if _field(reader, "general.type") != "adapter" or _field(reader, "adapter.type") != "lora":
        raise refuse(f"general.type {_field(reader, 'general.type')!r}, adapter.type "
                     f"{_field(reader, 'adapter.type')!r}: not a GGUF LoRA adapter")
    pairs: dict[str, dict[str, tuple]] = {}
    for t in reader.tensors:
        base, _, part = t.name.rpartition(".")
        if part in ("lora_a", "lora_b"):
            pairs.setdefault(base, {})[part] = tuple(int(x) for x in t.shape)
    if not pairs:
        raise refuse("the file holds no .lora_a / .lora_b tensors")
    base_tensors = None
    if model is not None:
        base_reader = _gguf(model, refuse, "the model")
        arch, mine = _field(base_reader, "general.architecture"), _field(reader, "general.architecture")
        if arch != mine:
            raise refuse(f"an adapter for architecture {mine!r}; the model is {arch!r}")
        if (_field(base_reader, "split.count") or 1) == 1:
            base_tensors = {t.name: tuple(int(x) for x in t.shape) for t in base_reader.tensors}
    for name, ab in sorted(pairs.items()):
        a, b = ab.get("lora_a"), ab.get("lora_b")  # ggml order: a [in, rank], b [rank, out]
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            raise refuse(f"{name}: lora_a and lora_b must both be matrices")
        if a[1] != b[0]:
            raise refuse(f"{name}: lora_a has rank {a[1]} but lora_b rank {b[0]}")
        if base_tensors is None:
            continue
        target = base_tensors.get(name)
        if target is None:
            raise refuse(f"the model has no tensor {name!r} (an adapter for another architecture?)")
        if (target[0], target[1]) != (a[0], b[1]):
            raise refuse(f"{name}: the adapter maps {a[0]} -> {b[1]} features, the model's tensor is "
                         f"{list(target)} (an adapter for another model size?)")

"""Resolve a spec to files on this worker's disk: model_uri, or model_id through the Hugging Face cache.

Paths are looked up on the worker's own host (a model_uri may exist on one host of the mesh only). Before a
launch the scheduler probes the workers (`probe`): the files must be there (the missing one is named), a
single-file model_uri must be the file of the quantization asked for, and their size sizes the placement.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from shared import protocol as p
from shared.errors import InvalidRequest, NotFound, ZinferError
from shared.models import EmbeddingFamily, LLMSpec, spec_file_name, uri_to_path
from shared.sizing import WEIGHT_SUFFIXES, estimate_memory, weights_bytes


def _from_hub(model_id: str, revision: str | None, filename: str | None = None) -> str:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if filename:
            return hf_hub_download(model_id, filename, revision=revision)
        return snapshot_download(model_id, revision=revision)
    except Exception as exc:  # offline and not cached, unknown repo, network: all mean "not available"
        what = f"{model_id}/{filename}" if filename else model_id
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        hint = " (HF_HUB_OFFLINE is set: only cached files can be used)" if offline else ""
        raise NotFound(f"model_id {what!r} is not in the Hugging Face cache and could not be downloaded{hint}: "
                       f"{type(exc).__name__}", field="model_id") from None


def _host() -> str:
    return socket.gethostname()


def local_llm_path(spec: LLMSpec, quantization: str) -> str | None:
    """The local files of a spec with a model_uri (a folder for pytorch, the quantization's file for gguf/ggml),
    checked; None when the spec has no model_uri (its files come from the Hub)."""
    if not spec.model_uri:
        return None
    path = uri_to_path(spec.model_uri)
    if path is None:
        raise InvalidRequest(f"model_uri {spec.model_uri!r} must be file:///absolute/path or an absolute path",
                             field="model_uri")
    if spec.model_format == "pytorch":
        if not os.path.isdir(path):
            raise NotFound(f"model_uri {path} does not exist on host {_host()}" if not os.path.exists(path)
                           else f"model_uri {path} is not a directory", field="model_uri")
        return path
    template = spec.model_file_name_template or ""
    if os.path.isdir(path):
        file = os.path.join(path, spec_file_name(template, quantization))
        if not os.path.isfile(file):
            raise NotFound(f"model file {file} (quantization {quantization}) does not exist on host {_host()}",
                           field="model_uri")
        return file
    if not os.path.isfile(path):
        raise NotFound(f"model_uri {path} does not exist on host {_host()}", field="model_uri")
    # One file: it must be the file of the quantization asked for, else the model loaded and the model listed differ.
    name = os.path.basename(path)
    named = [q for q in spec.quantizations if spec_file_name(template, q) == name]
    if named and quantization not in named:
        raise InvalidRequest(f"quantization {quantization!r}: model_uri names one file, {name}, which is the "
                             f"{named[0]} file of model_file_name_template; point model_uri at the folder holding "
                             "one file per quantization", field="quantization")
    if not named and len(spec.quantizations) > 1:
        raise InvalidRequest(f"model_uri names one file, {name}, that model_file_name_template names for none of "
                             f"{spec.quantizations}: the quantization of what would load is unknown; point "
                             "model_uri at a folder, or give the spec one quantization", field="model_uri")
    return path


def local_embedding_path(family: EmbeddingFamily) -> str | None:
    if not family.model_uri:
        return None
    path = uri_to_path(family.model_uri)
    if path is None or not os.path.isdir(path):
        raise NotFound(f"model_uri {path or family.model_uri!r} is not a directory on host {_host()}",
                       field="model_uri")
    return path


def resolve_llm_files(spec: LLMSpec, quantization: str) -> str:
    """A directory for pytorch, a file for gguf/ggml."""
    if spec.model_format == "ggmlv3":
        raise InvalidRequest(
            "ggmlv3 files cannot be read by current llama.cpp; convert the file to GGUF "
            "(llama.cpp's convert_llama_ggml_to_gguf.py) and register a ggufv2 spec", field="model_format")
    local = local_llm_path(spec, quantization)
    if local is not None:
        return local
    if spec.model_format == "pytorch":
        return _from_hub(spec.model_id, spec.model_revision)
    return _from_hub(spec.model_id, spec.model_revision, spec_file_name(spec.model_file_name_template, quantization))


def resolve_embedding_files(family: EmbeddingFamily) -> str:
    return local_embedding_path(family) or _from_hub(family.model_id, family.model_revision)


def weights_summary(path: str) -> tuple[int, int]:
    """(weight files, bytes) at a model path: a file, or a folder's weight files."""
    where = Path(path)
    if where.is_file():
        return 1, where.stat().st_size
    found = [f for f in where.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    return len(found), sum(f.stat().st_size for f in found)


def probe(msg: p.ProbeFiles, device_kind: str) -> p.FileProbe:
    """Whether this host has a spec's files, and the memory one instance needs here (from them, or from the
    parameter count when they would come from the Hub at load)."""
    try:
        if msg.model_type == "embedding":
            path = local_embedding_path(msg.embedding)
        else:
            path = local_llm_path(msg.spec, msg.quantization or "")
    except ZinferError as exc:
        return p.FileProbe(ok=False, problem=exc.message, code=exc.code, field=exc.field, host=_host())
    need = estimate_memory(msg.spec, msg.quantization, msg.embedding, device_kind, path)
    return p.FileProbe(ok=True, path=path or "", size=weights_bytes(Path(path)) if path else 0, memory=need,
                       host=_host())

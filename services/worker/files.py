"""Resolve a spec to files on disk: model_uri, or model_id through the Hugging Face cache."""

from __future__ import annotations

import os

from shared.errors import InvalidRequest, NotFound
from shared.models import EmbeddingFamily, LLMSpec, spec_file_name, uri_to_path


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


def resolve_llm_files(spec: LLMSpec, quantization: str) -> str:
    """A directory for pytorch, a file for gguf/ggml."""
    if spec.model_format == "ggmlv3":
        raise InvalidRequest(
            "ggmlv3 files cannot be read by current llama.cpp; convert the file to GGUF "
            "(llama.cpp's convert_llama_ggml_to_gguf.py) and register a ggufv2 spec", field="model_format")
    if spec.model_format == "pytorch":
        if spec.model_uri:
            path = uri_to_path(spec.model_uri)
            if not path or not os.path.isdir(path):
                raise NotFound(f"model_uri {spec.model_uri!r} is not a directory", field="model_uri")
            return path
        return _from_hub(spec.model_id, spec.model_revision)
    filename = spec_file_name(spec.model_file_name_template, quantization)
    if spec.model_uri:
        path = uri_to_path(spec.model_uri)
        if path and os.path.isdir(path):
            path = os.path.join(path, filename)
        if not path or not os.path.isfile(path):
            raise NotFound(f"model file {path or spec.model_uri!r} does not exist", field="model_uri")
        return path
    return _from_hub(spec.model_id, spec.model_revision, filename)


def resolve_embedding_files(family: EmbeddingFamily) -> str:
    if family.model_uri:
        path = uri_to_path(family.model_uri)
        if not path or not os.path.isdir(path):
            raise NotFound(f"model_uri {family.model_uri!r} is not a directory", field="model_uri")
        return path
    return _from_hub(family.model_id, family.model_revision)

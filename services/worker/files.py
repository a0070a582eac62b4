"""Resolve a spec to files on this worker's disk: model_uri, or model_id through the Hugging Face cache (downloaded
at launch with progress, stopped by a terminate).

Paths are looked up on the worker's own host (a model_uri may exist on one host of the mesh only). Before a
launch the scheduler probes the workers (`probe`): the files must be there (the missing one is named), a
single-file model_uri must be the file of the quantization asked for, and their size sizes the placement.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from zinfer.shared import protocol as p
from zinfer.shared.errors import Cancelled, InvalidRequest, NotFound, ZinferError, storage_error
from zinfer.shared.hub import hub_error
from zinfer.shared.models import EmbeddingFamily, LLMSpec, RerankSpec, spec_file_name, spec_file_names, uri_to_path
from zinfer.shared.sizing import WEIGHT_SUFFIXES, estimate_memory, weights_bytes


class Fetch:
    """One launch's view of its downloads: `progress(done, total)` in bytes as files arrive, and `cancelled()`
    polled as they do (a terminate during the launch stops the download at the next block)."""

    def __init__(self, progress: Callable[[int, int], None] = lambda done, total: None,
                 cancelled: Callable[[], bool] = lambda: False, endpoints: dict[str, str] | None = None):
        self.progress = progress
        self.cancelled = cancelled
        self.endpoints = {k.lower(): v for k, v in (endpoints or {}).items()}  # the hub_endpoints setting

    def endpoint(self, hub: str | None) -> str | None:
        """The endpoint of a spec's model_hub: None for the Hugging Face Hub (HF_ENDPOINT applies)."""
        if hub is None or hub.lower() == "huggingface":
            return None
        if hub.lower() not in self.endpoints:
            raise InvalidRequest(f"model_hub {hub!r}: this worker's hub_endpoints setting does not name it",
                                 field="model_hub")
        return self.endpoints[hub.lower()]


def _bar_class(fetch: Fetch, total: int):
    """A tqdm class for huggingface_hub that shows nothing and counts the bytes written to disk: the per-file bar
    of a single download, or the snapshot's reconstruction bar (the snapshot's transfer bar and its file counter
    would count twice). Every update checks for a cancel."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    counted = {"huggingface_hub.http_get", "huggingface_hub.xet_get", "huggingface_hub.snapshot_download"}
    lock = threading.Lock()
    done = [0]

    class Bar(hf_tqdm):
        def __init__(self, *args, name: str | None = None, **kwargs):
            kwargs["disable"] = True
            self._counts = name in counted
            super().__init__(*args, name=name, **kwargs)

        def update(self, n=1):
            if fetch.cancelled():
                raise Cancelled("the launch was cancelled (terminated) during its download")
            if self._counts and n:
                with lock:
                    done[0] += int(n)
                    fetch.progress(done[0], max(total, done[0]))
            return super().update(n)

    return Bar


def _from_hub(model_id: str, revision: str | None, filename: str | None = None, fetch: Fetch | None = None,
              hub: str | None = None) -> str:
    """The files of a Hub repository (the whole snapshot, or one file) in the standard Hugging Face cache,
    downloaded now unless they are there. HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE work as in huggingface_hub;
    another `hub` downloads from its endpoint in the hub_endpoints setting."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    fetch = fetch or Fetch()
    endpoint = fetch.endpoint(hub)
    # huggingface_hub writes (and reports) a download in blocks of DOWNLOAD_CHUNK_SIZE, 10 MiB: 1 MiB blocks make
    # the progress finer and a terminate stop within a MiB, at no measurable cost to the transfer.
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, 1 << 20)
    what = f"{model_id}/{filename}" if filename else model_id
    get = (lambda **kw: hf_hub_download(model_id, filename, revision=revision, endpoint=endpoint, **kw)) \
        if filename else (lambda **kw: snapshot_download(model_id, revision=revision, endpoint=endpoint, **kw))
    try:
        total = 0
        if not constants.HF_HUB_OFFLINE:
            try:  # sizes first (the Hub's metadata only), for "done of total"; offline, the cache decides below
                planned = get(dry_run=True)
                total = sum(f.file_size or 0 for f in (planned if isinstance(planned, list) else [planned])
                            if f.will_download)
            except Exception:
                total = 0
        if total:
            fetch.progress(0, total)
        return get(tqdm_class=_bar_class(fetch, total))
    except ZinferError:
        raise
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise hub_error(exc, model_id, revision, filename, " for the workers") from None
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:  # this host's disk, not the model: say so, not "not found"
            raise storage_error("download into the Hugging Face cache at", constants.HF_HUB_CACHE, exc,
                                field="model_id") from None
        raise _unavailable(model_id, what, exc) from None
    except Exception as exc:
        raise _unavailable(model_id, what, exc) from None


STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT}


def _unavailable(model_id: str, what: str, exc: Exception) -> NotFound:
    """Offline and not cached, or the network: not available on this host now."""
    from huggingface_hub import constants

    hint = " (HF_HUB_OFFLINE is set: only cached files can be used)" if constants.HF_HUB_OFFLINE else ""
    return NotFound(f"model_id {what!r} is not in the Hugging Face cache of host {_host()} and could not be "
                    f"downloaded from {constants.ENDPOINT}{hint}: {type(exc).__name__}", field="model_id")


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
    names = spec_file_names(spec, quantization)
    if os.path.isdir(path):
        _check_parts(path, names, quantization)
        return os.path.join(path, names[0])
    if not os.path.isfile(path):
        raise NotFound(f"model_uri {path} does not exist on host {_host()}", field="model_uri")
    if len(names) > 1 and os.path.basename(path) == names[0]:  # the first part of a split model: the rest beside it
        _check_parts(os.path.dirname(path), names, quantization)
        return path
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


def _check_parts(folder: str, names: list[str], quantization: str) -> None:
    """Every file of the quantization in `folder`; the first missing one is named."""
    for i, name in enumerate(names):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            what = f"part {i + 1} of {len(names)}, " if len(names) > 1 else ""
            raise NotFound(f"model file {file} ({what}quantization {quantization}) does not exist on host "
                           f"{_host()}", field="quantization_parts" if len(names) > 1 else "model_uri")


def projector_path(model_file: str, name: str) -> str:
    """A GGUF model's multimodal projector: the file `name` beside the model file, checked."""
    path = os.path.join(os.path.dirname(model_file), name)
    if not os.path.isfile(path):
        raise NotFound(f"multimodal_projector {name!r}: {path} does not exist on host {_host()}",
                       field="multimodal_projector")
    return path


def resolve_projector(spec: LLMSpec, model_file: str, name: str, fetch: Fetch | None = None) -> str:
    """The launch's multimodal projector on this host: beside a local model file, else from the spec's Hub
    repository (where it lands beside the model's file)."""
    if spec.model_uri:
        return projector_path(model_file, name)
    return _from_hub(spec.model_id, spec.model_revision, name, fetch, spec.model_hub)


def local_folder_path(family: EmbeddingFamily | RerankSpec) -> str | None:
    """The folder an embedding model's (or a rerank spec's) model_uri names on this host; None: from the Hub."""
    if not family.model_uri:
        return None
    path = uri_to_path(family.model_uri)
    if path is None or not os.path.isdir(path):
        raise NotFound(f"model_uri {path or family.model_uri!r} is not a directory on host {_host()}",
                       field="model_uri")
    return path


def resolve_llm_files(spec: LLMSpec, quantization: str, fetch: Fetch | None = None) -> str:
    """A directory for pytorch, a file for gguf/ggml (a GGML v3 file as it is: the instance converts it)."""
    local = local_llm_path(spec, quantization)
    if local is not None:
        return local
    if spec.model_format == "pytorch":
        return _from_hub(spec.model_id, spec.model_revision, fetch=fetch, hub=spec.model_hub)
    names = spec_file_names(spec, quantization)
    paths = [_from_hub(spec.model_id, spec.model_revision, name, fetch, spec.model_hub) for name in names]
    return paths[0]  # a split model's parts land side by side in the snapshot; llama.cpp opens the first


def resolve_embedding_files(family: EmbeddingFamily, fetch: Fetch | None = None) -> str:
    """An embedding model's files: a sentence-transformers folder, or a GGUF file (its first part, if split)."""
    spec = family.spec
    if spec.model_format == "pytorch":
        return resolve_folder_files(family, fetch)
    return resolve_llm_files(spec.as_llm_spec(), spec.quantization, fetch)


def local_embedding_path(family: EmbeddingFamily) -> str | None:
    spec = family.spec
    if spec.model_format == "pytorch":
        return local_folder_path(family)
    return local_llm_path(spec.as_llm_spec(), spec.quantization)


def resolve_folder_files(family: EmbeddingFamily | RerankSpec, fetch: Fetch | None = None) -> str:
    """An embedding model's or a rerank spec's folder: its model_uri here, else from the Hub."""
    return local_folder_path(family) or _from_hub(family.model_id, family.model_revision, fetch=fetch,
                                                  hub=family.model_hub)


def weights_summary(path: str) -> tuple[int, int]:
    """(weight files, bytes) at a model path: a file, or a folder's weight files."""
    where = Path(path)
    if where.is_file():
        return 1, where.stat().st_size
    found = [f for f in where.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    return len(found), sum(f.stat().st_size for f in found)


def find_paths(msg: p.FindPaths) -> p.PathsFound:
    """Which of these folders and files this host has (absolute paths only)."""
    host = _host()
    found = {d: [host] for d in msg.dirs if os.path.isabs(d) and os.path.isdir(d)}
    found.update({f: [host] for f in msg.files if os.path.isabs(f) and os.path.isfile(f)})
    return p.PathsFound(found=found, hosts=[host])


def probe(msg: p.ProbeFiles, device_kind: str) -> p.FileProbe:
    """Whether this host has a spec's files, and the memory one instance needs here (from them, or from the
    parameter count when they would come from the Hub at load)."""
    try:
        if msg.model_type == "embedding":
            path = local_embedding_path(msg.embedding)
        elif msg.model_type == "rerank":
            path = local_folder_path(msg.rerank.spec)
        elif msg.model_type == "audio":
            path = local_folder_path(msg.audio)
        else:
            path = local_llm_path(msg.spec, msg.quantization or "")
    except ZinferError as exc:
        return p.FileProbe(ok=False, problem=exc.message, code=exc.code, field=exc.field, host=_host())
    need = estimate_memory(msg.spec, msg.quantization, msg.embedding or msg.rerank or msg.audio, device_kind, path)
    if msg.projector and path:  # the vision encoder loads beside the model, on the same device
        try:
            need += os.path.getsize(projector_path(path, msg.projector))
        except ZinferError as exc:
            return p.FileProbe(ok=False, problem=exc.message, code=exc.code, field=exc.field, host=_host())
    context = files_context_length(path) if msg.read_context and path and msg.model_type == "LLM" else 0
    return p.FileProbe(ok=True, path=path or "", size=weights_bytes(Path(path)) if path else 0, memory=need,
                       host=_host(), context_length=context)


def files_context_length(path: str) -> int:
    """The context length a model's own files give: config.json's max_position_embeddings (its text_config's for a
    multimodal model) in a folder, {arch}.context_length in a GGUF file's metadata; 0 when they say nothing."""
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, "config.json"), "rb") as f:
                config = json.loads(f.read(16 << 20))
            text = config.get("text_config") or config
            return int(text.get("max_position_embeddings") or config.get("max_position_embeddings") or 0)
        import gguf

        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        field = reader.fields.get(f"{arch}.context_length")
        return int(field.contents()) if field is not None else 0
    except Exception:  # unreadable or unusual files: the named model's context length stands
        return 0

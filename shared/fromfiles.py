"""A registration filled in from model files: `zinfer register --from-path PATH`.

Reads only small files and headers, never the weights: config.json, generation_config.json, the tokenizer's
files and chat template, sentence-transformers' module files, safetensors headers (for the parameter count) and
GGUF metadata and tensor shapes (gguf's reader maps the file; tensor data is not read). The result is Xinference's
version 2 JSON, which the person can review before it is registered.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from zinfer.shared.errors import InvalidRequest
from zinfer.shared.hub import hub_error
from zinfer.shared.models import MODEL_NAME_RE

MAX_JSON = 16 << 20


def _json(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_JSON))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _size(params: int) -> str:
    """Parameters -> model_size_in_billions as Xinference writes it: "7", "1_8", "0_5", "0_0001"."""
    billions = params / 1e9
    if billions >= 10:
        return str(round(billions))
    text = f"{billions:.2g}" if billions < 1 else f"{billions:.1f}".rstrip("0").rstrip(".")
    if "e" in text:
        text = f"{billions:.10f}".rstrip("0")
    return text.replace(".", "_")


def _name(path: Path, name: str | None) -> str:
    if name:
        return name
    stem = path.name[:-5] if path.name.endswith(".gguf") else path.name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "model"
    return stem if MODEL_NAME_RE.fullmatch(stem) else f"m-{stem}"


def _safetensors_params(folder: Path) -> int:
    """Parameters of every *.safetensors file, from their headers (8-byte length, then JSON)."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_JSON:
                raise InvalidRequest(f"model_path: {file.name} has a {length}-byte header; not a safetensors file",
                                     field="model_path")
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info.get("shape", []):
                    n *= d
                total += n
    return total


def _template(folder: Path, tok_cfg: dict) -> str:
    texts = []
    if (folder / "chat_template.jinja").is_file():
        texts.append((folder / "chat_template.jinja").read_text(errors="replace"))
    for extra in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        texts.append(extra.read_text(errors="replace"))
    processor_template = _json(folder / "chat_template.json").get("chat_template")  # older processors' file
    if isinstance(processor_template, str):
        texts.append(processor_template)
    template = tok_cfg.get("chat_template")
    if isinstance(template, str):
        texts.append(template)
    elif isinstance(template, list):
        texts += [t.get("template", "") for t in template if isinstance(t, dict)]
    return "\n".join(texts)


def _llm_abilities(template: str, tokens: set[str]) -> tuple[list[str], dict]:
    """(abilities, reasoning tags) from the chat template and the tokenizer's added tokens."""
    abilities, extra = ["generate"], {}
    if template:
        abilities.append("chat")
        if "tools" in template:
            abilities.append("tools")
    if {"<think>", "</think>"} <= tokens:
        abilities.append("reasoning")
        extra = {"reasoning_start_tag": "<think>", "reasoning_end_tag": "</think>"}
    return abilities, extra


def _languages(folder: Path) -> list[str]:
    """The model card's `language:` list (README.md's front matter), else English."""
    readme = folder / "README.md"
    try:
        text = readme.read_text(errors="replace")[:20000]
    except OSError:
        return ["en"]
    front = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    match = re.search(r"^language:\s*(?:\[(.*?)\]|((?:\n\s*-\s*\S+)+)|(\S+))", front, re.M)
    if not match:
        return ["en"]
    raw = match.group(1) or match.group(2) or match.group(3) or ""
    langs = [x.strip(" -'\"") for x in re.split(r"[,\n]", raw) if x.strip(" -'\"")]
    return langs or ["en"]


def _from_folder(folder: Path, model_type: str | None, name: str | None, params: int | None = None
                 ) -> tuple[str, dict]:
    config = _json(folder / "config.json")
    if not config and not (folder / "modules.json").is_file():
        raise InvalidRequest(f"model_path: {folder} holds no model (no config.json, no .gguf file)", field="model_path")
    uri = f"file://{folder}"
    sentence = (folder / "modules.json").is_file() or (folder / "config_sentence_transformers.json").is_file()
    labels = config.get("id2label") or {}
    classifier = any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])
    kind = model_type or ("embedding" if sentence else "rerank" if classifier and len(labels) <= 1 else "LLM")
    common = {"version": 2, "model_name": _name(folder, name)}
    if kind == "embedding":
        pooling = _json(next(iter(sorted(folder.glob("*Pooling/config.json"))), folder / "-"))
        dims = pooling.get("word_embedding_dimension") or config.get("hidden_size")
        for dense in sorted(folder.glob("*Dense/config.json")):
            dims = _json(dense).get("out_features", dims)
        bert = _json(folder / "sentence_bert_config.json")
        max_tokens = bert.get("max_seq_length") or config.get("max_position_embeddings") or 512
        if not dims:
            raise InvalidRequest(f"model_path: {folder} does not say its embedding size", field="model_path")
        return kind, {**common, "dimensions": dims, "max_tokens": max_tokens, "language": _languages(folder),
                      "model_specs": [{"model_format": "pytorch", "model_uri": uri, "quantization": "none"}]}
    if kind == "rerank":
        return kind, {**common, "type": "normal", "language": _languages(folder),
                      "max_tokens": config.get("max_position_embeddings") or 512,
                      "model_specs": [{"model_format": "pytorch", "model_uri": uri, "quantization": "none"}]}
    tok_cfg = _json(folder / "tokenizer_config.json")
    tokens = {t.get("content") for t in (_json(folder / "tokenizer.json").get("added_tokens") or [])}
    tokens |= {t.get("content") for t in (tok_cfg.get("added_tokens_decoder") or {}).values()
               if isinstance(t, dict)}
    abilities, extra = _llm_abilities(_template(folder, tok_cfg), tokens)
    if isinstance(config.get("vision_config"), dict) and "chat" in abilities:  # an image-text-to-text model
        abilities.append("vision")
    qcfg = config.get("quantization_config") or {}
    quantization = "4-bit" if qcfg.get("load_in_4bit") or qcfg.get("bits") == 4 else \
        "8-bit" if qcfg.get("load_in_8bit") or qcfg.get("bits") == 8 else "none"
    params = _safetensors_params(folder) if params is None else params
    text_cfg = config.get("text_config") or config
    out = {**common, "model_lang": _languages(folder), "model_ability": abilities, "model_family": "other",
           "context_length": text_cfg.get("max_position_embeddings") or config.get("max_seq_len") or 2048,
           "model_specs": [{"model_format": "pytorch", "model_size_in_billions": _size(params) if params else "1",
                            "quantization": quantization, "model_uri": uri}], **extra}
    if config.get("architectures"):
        out["architectures"] = config["architectures"]
    eos = _json(folder / "generation_config.json").get("eos_token_id")
    if eos is not None:
        out["stop_token_ids"] = eos if isinstance(eos, list) else [eos]
    return kind, out


def _from_gguf(file: Path, model_type: str | None, name: str | None) -> tuple[str, dict]:
    import gguf

    if model_type not in (None, "LLM", "embedding"):
        raise InvalidRequest(f"model_type: a GGUF file registers as an LLM or an embedding model, not "
                             f"{model_type!r}", field="model_type")
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as exc:  # not a GGUF file
        raise InvalidRequest(f"model_path: {file} is not a GGUF file zinfer can read ({exc})",
                             field="model_path") from None

    def field(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture") or "llama"
    if arch == "clip":
        raise InvalidRequest(f"model_path: {file} is a multimodal projector (an mmproj file), not a model; give the "
                             "model's .gguf file (the projectors beside it are found)", field="model_path")
    file_type = field("general.file_type")
    try:
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_") \
            if file_type is not None else "F32"
    except ValueError:
        quant = "unknown"
    params = sum(int(t.n_elements) for t in reader.tensors)
    if quant.lower() in file.name.lower():
        at = file.name.lower().index(quant.lower())
        template, quantization = file.name[:at] + "{quantization}" + file.name[at + len(quant):], file.name[
            at:at + len(quant)]
    else:  # the quantization is not in the name: the name is the quantization
        template, quantization = "{quantization}.gguf", file.name[:-5]
    base = template.replace("{quantization}", "").removesuffix(".gguf").strip("._-")
    pooling = field(f"{arch}.pooling_type")
    if model_type == "embedding" or (model_type is None and pooling not in (None, 0, 4) and
                                     field(f"{arch}.attention.causal") is False):
        # An encoder with a pooling of its own (BERT-style): an embedding model on llama.cpp.
        return "embedding", {
            "version": 2, "model_name": _name(Path(base or file.name), name),
            "dimensions": int(field(f"{arch}.embedding_length") or 0), "language": ["en"],
            "max_tokens": int(field(f"{arch}.context_length") or 512),
            "model_specs": [{"model_format": "ggufv2", "quantization": quantization,
                             "model_uri": f"file://{file.parent}", "model_file_name_template": template}]}
    chat = field("tokenizer.chat_template") or ""
    tokens = set(field("tokenizer.ggml.tokens") or [])
    abilities, extra = _llm_abilities(chat, tokens)
    out = {"version": 2, "model_name": _name(Path(base or file.name), name), "model_lang": ["en"],
           "model_ability": abilities,
           "model_family": "other", "context_length": field(f"{arch}.context_length") or 2048,
           "model_specs": [{"model_format": "ggufv2", "model_size_in_billions": _size(params),
                            "quantization": quantization, "model_uri": f"file://{file.parent}",
                            "model_file_name_template": template}], **extra}
    eos = field("tokenizer.ggml.eos_token_id")
    if eos is not None:
        out["stop_token_ids"] = [int(eos)]
    projectors = _projectors(file.parent)
    if projectors:  # llama.cpp's vision: an mmproj file beside the model
        out["model_specs"][0]["multimodal_projectors"] = projectors
        if "chat" in abilities:
            abilities.append("vision")
    return "LLM", out


def _projectors(folder: Path) -> list[str]:
    """The multimodal projectors (GGUF files of architecture `clip`) in a folder, by name."""
    import gguf

    found = []
    for candidate in sorted(folder.glob("*.gguf")):
        if "mmproj" not in candidate.name.lower():
            continue
        try:
            arch = gguf.GGUFReader(str(candidate)).fields["general.architecture"].contents()
        except Exception:  # not a GGUF file after all
            continue
        if arch == "clip":
            found.append(candidate.name)
    return found


def registration_from_path(path: str, model_type: str | None = None, name: str | None = None) -> tuple[str, dict]:
    """(model type, Xinference's version 2 JSON) for the model at `path`: a folder or a .gguf file."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise InvalidRequest(f"model_path: {path} does not exist", field="model_path")
    if p.is_file():
        if not p.name.endswith(".gguf"):
            raise InvalidRequest(f"model_path: {path} is a file but not a .gguf file; give a model folder or a GGUF "
                                 "file", field="model_path")
        return _from_gguf(p, model_type, name)
    return _from_folder(p, model_type, name)


# What --from-hub fetches: configuration, tokenizer and template files and the model card; never weights.
HUB_FILES = ["*.json", "*.jinja", "README.md"]


def registration_from_hub(repo_id: str, model_type: str | None = None, name: str | None = None,
                          revision: str | None = None) -> tuple[str, dict]:
    """(model type, version 2 JSON) for a Hugging Face repository, from its small files only (HUB_FILES, into the
    Hugging Face cache; HF_ENDPOINT and HF_TOKEN as for downloads) and its safetensors headers (the Hub's
    metadata, by byte ranges); its specs name the repository (model_id, model_hub, model_revision), not a path."""
    from huggingface_hub import get_safetensors_metadata, snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except Exception as exc:
        raise hub_error(exc, repo_id, revision) or InvalidRequest(
            f"model_id {repo_id!r}: its files could not be fetched ({type(exc).__name__}: {exc})",
            field="model_id") from None
    if not (folder / "config.json").is_file() and not (folder / "modules.json").is_file():
        raise InvalidRequest(f"model_id {repo_id!r} has no config.json (a GGUF-only repository, or not a model): "
                             "download its file and use --from-path", field="model_id")
    try:
        params = sum(get_safetensors_metadata(repo_id, revision=revision).parameter_count.values())
    except Exception:  # no safetensors weights, or the Hub does not answer ranges: the size is left to the person
        params = 0
    kind, out = _from_folder(folder, model_type, name or repo_id.rsplit("/", 1)[-1], params)
    for spec in out["model_specs"]:
        spec.pop("model_uri", None)
        spec.update(model_id=repo_id, model_hub="huggingface", model_revision=revision)
    return kind, out

"""Model files checked before an engine sees them: what would make an engine raise an unhelpful error, or abort
the whole process, is refused as InvalidRequest naming `model_uri` and the reason.

- Hugging Face folders: config.json and the tokenizer's JSON files must parse as JSON objects; each safetensors
  file must hold the bytes its header promises (a truncated download otherwise fails deep in the loader).
- GGUF files (and GGML v3 files converted to GGUF): the header and metadata must read; a SentencePiece ("llama")
  vocabulary must have a token for each of the 256 bytes and no token twice. llama.cpp throws
  std::out_of_range from llama_vocab::byte_to_token for a missing byte at the first prompt with such a byte,
  and the uncaught exception aborts the process (SIGABRT).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from zinfer.shared.errors import InvalidRequest

# safetensors: an 8-byte little-endian header length, then a JSON header of tensors with data offsets.
_MAX_SAFETENSORS_HEADER = 100 * 2**20


def refuse(path: str | os.PathLike, why: str) -> InvalidRequest:
    return InvalidRequest(f"{path}: {why}", field="model_uri")


def _json(path: Path, want_object: bool = True) -> None:
    try:
        value = json.loads(path.read_bytes())
    except OSError as exc:
        raise refuse(path, f"cannot be read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refuse(path, f"is not valid JSON ({exc})") from None
    if want_object and not isinstance(value, dict):
        raise refuse(path, f"must hold a JSON object, not {type(value).__name__}")


def check_safetensors(path: Path) -> None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise refuse(path, f"is {size} bytes: too short for a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_SAFETENSORS_HEADER, size - 8):
                raise refuse(path, f"is truncated or not a safetensors file (its header claims {length:,} bytes; "
                                   f"the file has {size:,})")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise refuse(path, f"cannot be read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise refuse(path, "has a safetensors header that is not valid JSON") from None
    if not isinstance(header, dict):
        raise refuse(path, "has a safetensors header that is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise refuse(path, f"has no valid data_offsets for tensor {name!r}")
        end = max(end, offsets[1])
    if 8 + length + end > size:
        raise refuse(path, f"is truncated: its tensors need {8 + length + end:,} bytes, the file has {size:,}")


def check_hf_folder(folder: str | os.PathLike) -> None:
    """A transformers or sentence-transformers folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return  # a single file: the engine's own error names it
    config = folder / "config.json"
    if config.exists():
        _json(config)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                 "sentence_bert_config.json", "modules.json"):
        if (folder / name).exists():
            _json(folder / name, want_object=name != "modules.json")  # modules.json is a list
    for weights in sorted(folder.rglob("*.safetensors")):
        check_safetensors(weights)


def check_gguf(path: str | os.PathLike) -> None:
    """A GGUF file llama.cpp can load without aborting."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError, struct or numpy errors on damaged files
        raise refuse(path, f"is not a readable GGUF file ({type(exc).__name__}: {exc})") from None

    def field(name: str):
        f = reader.fields.get(name)
        return None if f is None else f

    model = field("tokenizer.ggml.model")
    tokens_field = field("tokenizer.ggml.tokens")
    if tokens_field is None:
        return  # no vocabulary of its own (llama.cpp refuses such a file with a message; nothing aborts)
    tokens = [bytes(tokens_field.parts[i]) for i in tokens_field.data]
    if len(set(tokens)) != len(tokens):
        first: dict[bytes, int] = {}
        a, b = next((first[t], i) for i, t in enumerate(tokens) if first.setdefault(t, i) != i)
        raise refuse(path, f"has vocabulary entries {a} and {b} both reading {tokens[b]!r} (llama.cpp aborts on "
                           "a vocabulary with duplicates)")
    kind = bytes(model.parts[model.data[0]]).decode("utf-8", "replace") if model is not None else ""
    if kind == "llama":  # SentencePiece: bytes outside the pieces are written as <0xXX> tokens
        have = set(tokens)
        missing = [b for b in range(256) if f"<0x{b:02X}>".encode() not in have and bytes([b]) not in have]
        if missing:
            raise refuse(path, f"has a SentencePiece vocabulary without byte tokens for {len(missing)} of the 256 "
                               f"bytes (first: <0x{missing[0]:02X}>); llama.cpp aborts on the first prompt that "
                               "needs one")


def check_projector(path: str | os.PathLike) -> None:
    """A multimodal projector: a GGUF file of llama.cpp's `clip` architecture (an mmproj file)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
        arch = reader.fields["general.architecture"].contents()
    except Exception as exc:  # damaged, or no architecture
        raise InvalidRequest(f"{path}: is not a readable mmproj GGUF file ({type(exc).__name__}: {exc})",
                             field="multimodal_projector") from None
    if arch != "clip":
        raise InvalidRequest(f"{path}: is a GGUF file of architecture {arch!r}, not a multimodal projector (an "
                             "mmproj file's architecture is 'clip')", field="multimodal_projector")

"""GGML v3 ("ggjt" v3) LLaMA files to GGUF, once per file, at launch.

Current llama.cpp reads GGUF only; the seeds' ggmlv3 specs (TheBloke's `llama-2-7b.ggmlv3.q4_0.bin` and the like)
are GGML v3 files: a header, the vocabulary with scores, then the tensors, each 32-byte aligned. The tensor data
of the types both formats share (F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: GGJT v3 fixed their block layouts and
GGUF kept them) is copied byte for byte; only the metadata is rewritten. What GGML v3 does not record comes from
the file's own shapes where it can (the feed-forward width, the key/value head count of a grouped-query model) and
from the definition otherwise (context_length; RMS-norm epsilon 1e-5, LLaMA-2's).

The file format, as llama.cpp's loader of that time read it (little-endian):
    u32 magic 'ggjt', u32 version 3
    u32 n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype
    n_vocab x (u32 length, bytes text, f32 score)
    tensors until the end: u32 n_dims, u32 name length, u32 type, u32 dims[n_dims] (innermost first), name,
    padding to a multiple of 32 bytes of the file offset, data

The GGUF goes to <home>/cache/gguf-from-ggml/, named after the source file and a key of its path, size and
modification time (and what else the output depends on), written to a temporary file and renamed: a later launch
of the same file, on any worker of this home, opens it at once; a changed file is converted again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zinfer.shared.errors import Cancelled, InvalidRequest

CONVERTER_VERSION = 1  # part of the cache key: a converter change converts again
GGJT_MAGIC = 0x67676A74  # 'ggjt' as a little-endian u32 (the file starts b"tjgg")
RMS_NORM_EPS = 1e-5  # not in GGML v3 files; LLaMA-2's value (llama.cpp's converter guessed 5e-6 by default)
ALIGN = 32
CHUNK = 16 << 20  # bytes copied between two progress reports / cancel checks

# GGML tensor type id -> (name, elements per block, bytes per block); ids are the same in GGUF.
SHARED_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
                6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34)}
OTHER_TYPES = {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K"}
FTYPES = {0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 4: "MOSTLY_Q4_1_SOME_F16",
          7: "MOSTLY_Q8_0", 8: "MOSTLY_Q5_0", 9: "MOSTLY_Q5_1"}

# GGML LLaMA tensor names -> GGUF names ("{i}" the layer).
NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
LAYER_NAMES = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
               "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
               "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}


@dataclass
class Tensor:
    name: str
    dims: tuple[int, ...]  # innermost first, as GGML writes them
    type_id: int
    offset: int
    nbytes: int


@dataclass
class GGMLFile:
    path: Path
    n_vocab: int
    n_embd: int
    n_mult: int
    n_head: int
    n_layer: int
    n_rot: int
    ftype: int
    vocab: list[tuple[bytes, float]] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def tensor(self, name: str) -> Tensor:
        found = next((t for t in self.tensors if t.name == name), None)
        if found is None:
            raise self.error(f"has no tensor {name!r}: not a LLaMA-family model")
        return found

    def error(self, what: str) -> InvalidRequest:
        return InvalidRequest(f"GGML file {self.path} {what}", field="model_uri")


def _check_magic(path: Path, magic: int, version: int) -> None:
    """Only GGJT version 3 converts; anything else is refused saying what it is."""
    if magic == 0x46554747:  # b"GGUF"
        raise InvalidRequest(f"{path} is already GGUF: register it with model_format ggufv2", field="model_format")
    if magic in (0x67676D66, 0x67676D6C):  # 'ggmf', 'ggml': before GGJT
        raise InvalidRequest(f"{path} is an unversioned GGML/GGMF file (before GGJT v3); only GGJT v3 files convert: "
                             "re-quantize it with a llama.cpp of mid-2023 or use its GGUF", field="model_uri")
    if magic != GGJT_MAGIC:
        raise InvalidRequest(f"{path} is not a GGML file (magic {magic:#010x})", field="model_uri")
    if version != 3:
        raise InvalidRequest(f"{path} is GGJT version {version}; only version 3 converts (its quantized blocks "
                             "changed in v3)", field="model_uri")


def read_header(path: str | os.PathLike) -> GGMLFile:
    """The header, vocabulary and tensor table of a GGML v3 file (the data stays on disk); every length and offset
    is checked against the file's size, so a truncated or foreign file is refused with what is wrong."""
    path = Path(path)
    size = path.stat().st_size
    data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if pos + n > size:
            raise InvalidRequest(f"GGML file {path} ends inside {what} (offset {pos:,} of {size:,} bytes): "
                                 "truncated?", field="model_uri")
        chunk = memoryview(data[pos:pos + n])
        pos += n
        return chunk

    _check_magic(path, *struct.unpack("<2I", take(8, "the header")))
    hp = struct.unpack("<7I", take(28, "the hyperparameters"))
    f = GGMLFile(path, *hp)
    if f.ftype not in FTYPES and f.ftype not in (10, 11, 12, 13, 14, 15, 16, 17, 18):
        raise f.error(f"has an unknown file type {f.ftype}")
    if not 0 < f.n_vocab <= 1 << 20 or not 0 < f.n_head <= f.n_embd or not 0 < f.n_layer <= 4096:
        named = dict(zip(("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype"), hp, strict=True))
        raise f.error(f"has implausible hyperparameters {named}")
    for i in range(f.n_vocab):
        (length,) = struct.unpack("<I", take(4, f"vocabulary entry {i}"))
        if length > 4096:
            raise f.error(f"vocabulary entry {i} is {length:,} bytes long")
        text = bytes(take(length, f"vocabulary entry {i}"))
        (score,) = struct.unpack("<f", take(4, f"vocabulary entry {i}"))
        f.vocab.append((text, score))
    while pos < size:
        n_dims, name_len, type_id = struct.unpack("<3I", take(12, f"tensor {len(f.tensors)}'s header"))
        if not 1 <= n_dims <= 4 or name_len > 4096:
            raise f.error(f"tensor {len(f.tensors)} has {n_dims} dimensions and a {name_len}-byte name")
        dims = struct.unpack(f"<{n_dims}I", take(4 * n_dims, f"tensor {len(f.tensors)}'s dimensions"))
        name = bytes(take(name_len, f"tensor {len(f.tensors)}'s name")).decode("utf-8", "replace")
        if type_id not in SHARED_TYPES:
            kind = OTHER_TYPES.get(type_id, f"type {type_id}")
            raise f.error(f"tensor {name!r} is {kind}: only F32, F16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 convert "
                          "unchanged to GGUF; use a GGUF file of this model")
        _, block, block_bytes = SHARED_TYPES[type_id]
        elements = int(np.prod(dims, dtype=np.int64))
        if dims[0] % block:
            raise f.error(f"tensor {name!r}: {dims[0]} elements per row is not a multiple of {block}")
        pos += -pos % ALIGN
        nbytes = elements // block * block_bytes
        take(nbytes, f"tensor {name!r}'s data")
        f.tensors.append(Tensor(name, dims, type_id, pos - nbytes, nbytes))
    if not f.tensors:
        raise f.error("has no tensors")
    return f


def gguf_name(name: str) -> str | None:
    stem, dot, suffix = name.rpartition(".")
    if suffix != "weight":
        return None
    if stem in NAMES:
        return f"{NAMES[stem]}.weight"
    parts = stem.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"blk.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    return None


def _vocab(f: GGMLFile) -> tuple[list[bytes], list[float], list[int]]:
    """GGML v3 stored LLaMA's SentencePiece vocabulary as text: "▁" as a space, byte pieces as the byte itself,
    <unk>/<s>/</s> as " ⁇ " and empty strings. GGUF wants the pieces back, with their kinds."""
    import gguf

    tokens, scores, types = [], [], []
    for i, (text, score) in enumerate(f.vocab):
        kind = gguf.TokenType.NORMAL
        if i <= 2:
            text, kind = (b"<unk>", gguf.TokenType.UNKNOWN) if i == 0 else (
                (b"<s>" if i == 1 else b"</s>"), gguf.TokenType.CONTROL)
        elif not text:
            text, kind = f"<ctrl{i}>".encode(), gguf.TokenType.CONTROL
        elif 3 <= i <= 258 and len(text) == 1:
            text, kind = f"<0x{text[0]:02X}>".encode(), gguf.TokenType.BYTE
        else:
            text = text.replace(b" ", "\u2581".encode())
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))
    if len(set(tokens)) != len(tokens):  # llama.cpp aborts the whole process on a vocabulary with duplicates
        first: dict[bytes, int] = {}
        dup = next((first[t], i) for i, t in enumerate(tokens) if first.setdefault(t, i) != i)
        raise f.error(f"has vocabulary entries {dup[0]} and {dup[1]} both reading {tokens[dup[1]]!r}")
    return tokens, scores, types


class _Copy:
    """A tensor's bytes for GGUFWriter, copied from the source file in chunks that report progress and stop at a
    cancel (GGUFWriter calls tofile with its output file)."""

    def __init__(self, data: np.memmap, t: Tensor, shape: tuple[int, ...], step: Callable[[int], None]):
        self.data, self.t, self.step = data, t, step
        self.shape, self.dtype, self.nbytes = shape, np.dtype(np.uint8), t.nbytes

    def tofile(self, fout) -> None:
        end = self.t.offset + self.t.nbytes
        for start in range(self.t.offset, end, CHUNK):
            stop = min(end, start + CHUNK)
            fout.write(memoryview(self.data[start:stop]))
            self.step(stop - start)


def convert(src: str | os.PathLike, dst: str | os.PathLike, context_length: int,
            progress: Callable[[int, int], None] = lambda done, total: None,
            cancelled: Callable[[], bool] = lambda: False) -> Path:
    """Write src (GGML v3) as GGUF at dst, through a temporary file renamed into place."""
    import gguf

    f = read_header(src)
    names = {}
    for t in f.tensors:
        to = gguf_name(t.name)
        if to is None:
            raise f.error(f"has a tensor {t.name!r} that is not part of a LLaMA model")
        names[t.name] = to
    w1, wk = f.tensor("layers.0.feed_forward.w1.weight"), f.tensor("layers.0.attention.wk.weight")
    n_ff = w1.dims[1]
    kv_width = wk.dims[1] if len(wk.dims) > 1 else f.n_embd  # n_head_kv x head size
    head_size = f.n_embd // f.n_head
    if kv_width % head_size:
        raise f.error(f"attention.wk is {kv_width} wide, not a multiple of the head size {head_size}")
    total = f.data_bytes
    done = 0

    def step(n: int) -> None:
        nonlocal done
        if cancelled():
            raise Cancelled("the launch was cancelled (terminated) while converting its GGML file")
        done += n
        progress(done, total)

    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    data = np.memmap(f.path, dtype=np.uint8, mode="r")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_name(f.path.stem)
        writer.add_description(f"converted by zinfer from GGJT v3 ({FTYPES.get(f.ftype, f.ftype)})")
        if f.ftype in FTYPES:
            writer.add_file_type(f.ftype)
        writer.add_context_length(context_length)
        writer.add_embedding_length(f.n_embd)
        writer.add_block_count(f.n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_rope_dimension_count(f.n_rot or head_size)
        writer.add_head_count(f.n_head)
        writer.add_head_count_kv(kv_width // head_size)
        writer.add_layer_norm_rms_eps(RMS_NORM_EPS)
        tokens, scores, types = _vocab(f)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        for t in f.tensors:
            _, block, block_bytes = SHARED_TYPES[t.type_id]
            byte_shape = (*reversed(t.dims[1:]), t.dims[0] // block * block_bytes)  # outermost first
            writer.add_tensor(names[t.name], _Copy(data, t, byte_shape, step),
                              raw_dtype=gguf.GGMLQuantizationType(t.type_id))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        del data
    return dst


def cached_gguf(src: str, cache_dir: Path, context_length: int,
                progress: Callable[[int, int], None] = lambda done, total: None,
                cancelled: Callable[[], bool] = lambda: False) -> Path:
    """The GGUF of src in cache_dir, converted now unless an earlier launch did it. One conversion at a time per
    file across the workers sharing the home (a lock file); the others wait and reuse it."""
    st = os.stat(src)
    key = hashlib.sha256(f"{os.path.realpath(src)}|{st.st_size}|{st.st_mtime_ns}|{context_length}|"
                         f"{RMS_NORM_EPS}|{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    dst = cache_dir / f"{Path(src).stem}-{key}.gguf"
    if dst.exists():
        return dst
    with open(cache_dir / f".{dst.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dst.exists():
            return dst
        return convert(src, dst, context_length, progress, cancelled)

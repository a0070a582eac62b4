"""Test tooling for `zinfer dev make-tiny-models` (not used by any service): the tiny Llama's weights as GGML v3
("ggjt" v3) files, the format of 2023's llama.cpp that the seeds' ggmlv3 specs name and that the worker converts to
GGUF at launch (services/worker/instance/ggml.py), and the same weights and vocabulary written directly as GGUF, which
the converted files must equal.

GGML v3 files carry a LLaMA SentencePiece vocabulary (pieces with scores; <unk>, <s>, </s>, then the 256 byte
pieces), not the byte-level BPE of the tiny model's Hugging Face tokenizer; so these files get an SPM vocabulary
of the same size made from that tokenizer's merges (the embedding rows are random anyway). Written as 2023's
llama.cpp `convert.py` wrote them: a piece's "▁" as a space, a byte piece as the byte, <unk> as " ⁇ ", <s> and
</s> as empty strings.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

GGML_TEMPLATE = "tiny-llama.ggmlv3.{quantization}.bin"
SPM_GGUF_TEMPLATE = "tiny-llama-spm.{quantization}.gguf"
QUANTIZATIONS = ("q4_0", "q8_0")  # the seeds' ggmlv3 spec lists these two
_TYPES = {"f32": (0, 0), "q4_0": (2, 2), "q8_0": (8, 7)}  # quantization -> (tensor type id, file type)
GGJT_MAGIC, GGJT_VERSION = 0x67676A74, 3
GGML_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
GGML_LAYER_NAMES = {"attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
                    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
                    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3"}


def _ggml_name(gguf_name: str) -> str:
    stem = gguf_name.removesuffix(".weight")
    if stem in GGML_NAMES:
        return f"{GGML_NAMES[stem]}.weight"
    _, layer, part = stem.split(".", 2)
    return f"layers.{layer}.{GGML_LAYER_NAMES[part]}.weight"


def spm_vocab(hf_dir: Path, size: int) -> list[tuple[str, float, str]]:
    """(piece, score, kind) x size: <unk>, <s>, </s>, <0x00>..<0xFF>, then the BPE tokenizer's merged tokens as
    SentencePiece pieces (a space as "▁"), best merge first, then filler pieces up to size."""

    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    byte_of = _byte_level_decoder()
    vocab = [("<unk>", 0.0, "unknown"), ("<s>", 0.0, "control"), ("</s>", 0.0, "control")]
    vocab += [(f"<0x{b:02X}>", 0.0, "byte") for b in range(256)]
    seen = {piece for piece, _, _ in vocab}
    specials = {t["content"] for t in tok.get("added_tokens", [])}
    for token, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1]):
        if len(token) < 2 or token in specials or any(ch not in byte_of for ch in token):
            continue
        try:
            text = bytes(byte_of[ch] for ch in token).decode("utf-8")
        except UnicodeDecodeError:
            continue
        piece = text.replace(" ", "\u2581")
        if "\n" in piece or piece in seen or len(vocab) >= size:
            continue
        seen.add(piece)
        vocab.append((piece, -float(len(vocab)), "normal"))
    while len(vocab) < size:
        vocab.append((f"\u2581w{len(vocab)}", -float(len(vocab)), "normal"))
    return vocab


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _ggml_text(piece: str, kind: str) -> bytes:
    if kind == "unknown":
        return " \u2047 ".encode()
    if kind == "control":
        return b""
    if kind == "byte":
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


def _tensor_data(tensors: dict, quantization: str) -> list[tuple[str, int, tuple[int, ...], bytes]]:
    """(gguf name, type id, GGML dims innermost first, bytes): 2-D weights in the quantization, norms F32."""
    import gguf
    import numpy as np
    from gguf.quants import quantize

    type_id, _ = _TYPES[quantization]
    out = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        dims = tuple(reversed(array.shape))
        if array.ndim == 2 and type_id != 0:
            out.append((name, type_id, dims, quantize(array, gguf.GGMLQuantizationType(type_id)).tobytes()))
        else:
            out.append((name, 0, dims, array.tobytes()))
    return out


def write_ggml_v3(out_file: Path, cfg: dict, vocab: list[tuple[str, float, str]], tensors: dict,
                  quantization: str) -> Path:
    """The tiny Llama as a GGJT v3 file, laid out as llama.cpp's loader of mid-2023 read it."""
    n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    _, ftype = _TYPES[quantization]
    with open(out_file, "wb") as fd:
        fd.write(struct.pack("<2I", GGJT_MAGIC, GGJT_VERSION))
        fd.write(struct.pack("<7I", len(vocab), n_embd, 256, n_head, cfg["num_hidden_layers"], n_embd // n_head,
                             ftype))
        for piece, score, kind in vocab:
            text = _ggml_text(piece, kind)
            fd.write(struct.pack("<I", len(text)) + text + struct.pack("<f", score))
        for name, type_id, dims, data in _tensor_data(tensors, quantization):
            ggml_name = _ggml_name(name).encode()
            fd.write(struct.pack(f"<3I{len(dims)}I", len(dims), len(ggml_name), type_id, *dims) + ggml_name)
            fd.write(b"\0" * (-fd.tell() % 32))
            fd.write(data)
    return out_file


def write_spm_gguf(out_file: Path, cfg: dict, vocab: list[tuple[str, float, str]], tensors: dict,
                   quantization: str) -> Path:
    """The same weights and vocabulary as write_ggml_v3, written directly as GGUF (SentencePiece tokenizer)."""
    import gguf
    import numpy as np

    kinds = {"normal": gguf.TokenType.NORMAL, "unknown": gguf.TokenType.UNKNOWN,
             "control": gguf.TokenType.CONTROL, "byte": gguf.TokenType.BYTE}
    n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    w = gguf.GGUFWriter(str(out_file), "llama")
    w.add_name("tiny-llama-spm")
    w.add_file_type(_TYPES[quantization][1])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(n_embd)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([piece for piece, _, _ in vocab])
    w.add_token_scores([score for _, score, _ in vocab])
    w.add_token_types([int(kinds[kind]) for _, _, kind in vocab])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, type_id, dims, data in _tensor_data(tensors, quantization):
        raw = np.frombuffer(data, dtype=np.uint8).reshape(*reversed(dims[1:]), -1)
        w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(type_id))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file

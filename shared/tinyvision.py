"""A tiny random vision-language model built from configs in seconds, with no downloads: LLaVA's architecture
(a CLIP vision tower, a two-layer projector, a Llama) with the tiny Llama's trained tokenizer plus an `<image>`
token, a CLIP image processor of 32 x 32 pixels (4 x 4 patches of 8: 16 image tokens per image) and a chat
template that places each image part where the message puts it. Saved with save_pretrained (model and processor)
so AutoModelForImageTextToText and AutoProcessor load it as they load llava-hf's models."""

from __future__ import annotations

import io
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


def make_tiny_vision(root: Path, force: bool = False) -> dict[str, Path]:
    """root/tiny-llava, built unless it is there."""
    out = root / "tiny-llava"
    if force or not (out / "model.safetensors").exists():
        build_tiny_llava(out)
    return {"llava": out}

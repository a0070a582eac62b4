"""A one-image chat: served (through the mesh, the Python client; and through the gateway, the openai SDK) against
the model's own processor + generate on the same message in this process; same run, same model: a random LLaVA
of a small shape (a CLIP tower of width 256, 4 layers, 224 x 224 pixels in 14-pixel patches: 256 image tokens; a
Llama of width 512, 8 layers), 64 new tokens (EOS ignored). Tokens/s counts the new tokens over the whole request
(image, prefill and decode).

    .venv/bin/python bench/vision.py [--rounds 5] [--engine llama]

With `--engine llama` the same model runs on llama.cpp (its Llama as a GGUF file, its tower and projector as an
mmproj file, F32), against llama-cpp-python's own Llava15ChatHandler on the same files (the model's template), EOS
held off on both sides (min_tokens served, a logit bias raw).
"""

from __future__ import annotations

import base64
import io
import statistics
import time

from common import MODELS, arguments, record, start_mesh

from zinfer.shared.tinyvision import GGUF_TEMPLATE, MMPROJ, build_tiny_llava, llama_cpp_chat, png

NEW = 64


def llama_side(folder, messages: list[dict]):
    """(the spec, the raw run) of the llama.cpp case: GGUF and mmproj files of the model, llama-cpp-python's own."""
    from llama_cpp import llama_vocab_is_eog

    from zinfer.shared.tinymodels import make_llava_gguf

    gguf = make_llava_gguf(folder, MODELS / "llava-small-gguf")
    llm = llama_cpp_chat(gguf, GGUF_TEMPLATE.replace("{quantization}", "F32"), MMPROJ)
    vocab = llm._model.vocab
    never = {t: float("-inf") for t in range(llm.n_vocab()) if llama_vocab_is_eog(vocab, t)}

    def raw() -> str:
        out = llm.create_chat_completion(messages=messages, max_tokens=NEW, temperature=0, repeat_penalty=1.0,
                                         logit_bias=never)
        return out["choices"][0]["message"]["content"]

    spec = {"model_format": "ggufv2", "model_size_in_billions": 1, "quantization": "F32",
            "model_uri": f"file://{gguf}", "model_file_name_template": GGUF_TEMPLATE, "multimodal_projectors": [MMPROJ]}
    return spec, raw


def main() -> None:
    args = arguments(5, ("--engine", {"choices": ["transformers", "llama"], "default": "transformers"}))
    folder = MODELS / "llava-small"
    if not (folder / "model.safetensors").exists():
        build_tiny_llava(folder, init_std=0.02, image_size=224, patch_size=14, vision_hidden=256, vision_layers=4,
                         hidden=512, layers=8, heads=8)
    import openai

    image = png(320, 240, seed=1)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    if args.engine == "llama":
        spec, raw = llama_side(folder, messages)
        config = {"max_tokens": NEW, "temperature": 0, "min_tokens": NEW}
    else:
        spec, raw = transformers_side(folder, image)
        config = {"max_tokens": NEW, "temperature": 0, "ignore_eos": True}
    want = raw()
    mesh = start_mesh()
    try:
        mesh.start_gateway()
        from zinfer.shared import keys

        c = mesh.client
        c.register_model("LLM", {"version": 2, "model_name": "bench-llava", "model_family": "other",
                                 "model_lang": ["en"], "model_ability": ["chat", "vision"], "context_length": 2048,
                                 "model_specs": [spec]})
        c.launch_model(model_name="bench-llava", model_uid="llava", model_format=spec["model_format"])
        handle = c.get_model("llava")
        sdk = openai.OpenAI(base_url=f"{mesh.gateway_url}/v1", max_retries=0, timeout=120,
                            api_key=keys.api_key_of(keys.read_key_file(mesh.admin_key)))

        def served() -> str:
            return handle.chat(messages=messages, generate_config=config)["choices"][0]["message"]["content"]

        def http() -> str:
            return sdk.chat.completions.create(model="llava", messages=messages, max_tokens=NEW, temperature=0,
                                               extra_body={k: v for k, v in config.items()
                                                           if k in ("ignore_eos", "min_tokens")}
                                               ).choices[0].message.content

        assert served() == want and http() == want, (served(), want)  # the same text, or the timing means nothing
        times: dict[str, list[float]] = {"raw": [], "served": [], "http": []}
        for _ in range(args.rounds):  # interleaved, so that a busy moment hits every side alike
            for name, fn in (("raw", raw), ("served", served), ("http", http)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        mesh.stop()
    rate = {name: NEW / statistics.median(t) for name, t in times.items()}
    report = {"model": "random LLaVA, CLIP 256x4 (256 image tokens) + Llama 512x8", "engine": args.engine,
              "new_tokens": NEW, "raw_tok_s": round(rate["raw"], 1), "served_tok_s": round(rate["served"], 1),
              "http_tok_s": round(rate["http"], 1), "served_ratio": round(rate["served"] / rate["raw"], 3),
              "http_ratio": round(rate["http"] / rate["raw"], 3)}
    against = "llama-cpp-python's Llava15ChatHandler" if args.engine == "llama" else "processor + generate"
    print(f"one-image chat on {args.engine}, {NEW} new tokens: raw {against} {report['raw_tok_s']} tok/s, served "
          f"{report['served_tok_s']} tok/s = {report['served_ratio']}x raw, over HTTP (openai SDK) "
          f"{report['http_tok_s']} tok/s = {report['http_ratio']}x (target >= 0.9)")
    record("vision" if args.engine == "transformers" else "vision-llama", report)


def transformers_side(folder, image: bytes):
    """(the spec, the raw run) of the transformers case: the model's own processor and generate."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()

    def raw() -> str:
        hf = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                           {"type": "image", "image": Image.open(io.BytesIO(image))}]}]
        inputs = processor.apply_chat_template(hf, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    spec = {"model_format": "pytorch", "model_size_in_billions": 1, "quantization": "none",
            "model_uri": f"file://{folder}"}
    return spec, raw


if __name__ == "__main__":
    main()

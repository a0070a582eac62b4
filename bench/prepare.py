"""What one request's preparation costs the streams already running: the longest pause in a running stream while
another client's request arrives, against the pause that the same request's prefill alone makes (measured in the
same run). A stream of 240 tokens runs on the random LLaVA of bench/vision.py (transformers); after its first 40
tokens a second client sends one of:

- `images`: a chat with 4 photos of 4000 x 3000 pixels (JPEG). Decoding and resizing them to the tower's 224 x 224 is
  preparation; the baseline sends the same 4 images already at 224 x 224 (the same prefill).
- `oversized`: a 3.9 MB prompt, far over the context, refused once it is tokenized (about a million tokens to
  count). The baseline sends a one-line prompt.

    .venv/bin/python bench/prepare.py [--rounds 3]

Before preparing had a thread of its own (services/worker/instance/prepare.py), all of that ran on the compute loop,
and the running stream stopped for as long.
"""

from __future__ import annotations

import io
import statistics
import threading
import time

import numpy as np
from common import MODELS, arguments, record, start_mesh

from zinfer.shared.errors import ZinferError
from zinfer.shared.tinyvision import build_tiny_llava

STREAM, ARRIVE = 240, 40


def photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG of smooth colour fields with grain: the size and entropy of a phone photo."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [np.sin(x / rng.uniform(90, 400) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(90, 400)) for _ in "rgb"]
    pixels = (np.stack(channels, -1) * 100 + 128 + rng.normal(0, 6, (height, width, 3))).clip(0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "JPEG", quality=85)
    return out.getvalue()


def longest_pause(handle, second) -> float:
    """The longest gap between two text chunks of a stream, from its ARRIVE-th chunk (when `second` starts beside
    it) to the first chunk after `second` has its answer. (The stream is the same every time, temperature 0; its
    last stretch of tokens decodes to no text, so the window ends with `second`.)"""
    chunks = handle.chat(messages=[{"role": "user", "content": "Tell me a long story."}],
                         generate_config={"max_tokens": STREAM, "temperature": 0, "ignore_eos": True, "stream": True,
                                          "stream_interval_ms": 0})
    stamps, other, done = [], None, []
    for chunk in chunks:
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            stamps.append(time.perf_counter())
            if len(stamps) == ARRIVE:
                other = threading.Thread(target=lambda: (second(), done.append(time.perf_counter())))
                other.start()
    other.join()
    assert stamps[-1] > done[0], "the stream ended before the other request had its answer"
    window = [t for t in stamps[ARRIVE - 1:] if t <= done[0]]
    window.append(next(t for t in stamps if t > done[0]))
    return float(np.diff(window).max()) * 1000

def main() -> None:
    args = arguments(3)
    folder = MODELS / "llava-small"
    if not (folder / "model.safetensors").exists():
        build_tiny_llava(folder, init_std=0.02, image_size=224, patch_size=14, vision_hidden=256, vision_layers=4,
                         hidden=512, layers=8, heads=8)
    import base64

    from PIL import Image

    big = [photo(4000, 3000, seed) for seed in range(4)]
    small = []
    for data in big:
        out = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224)).save(out, "JPEG", quality=85)
        small.append(out.getvalue())

    def chat_with(images: list[bytes]) -> list[dict]:
        parts = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(i).decode()}}
                 for i in images]
        return [{"role": "user", "content": [{"type": "text", "text": "What do these show?"}, *parts]}]

    mesh = start_mesh()
    try:
        c = mesh.client
        c.register_model("LLM", {"version": 2, "model_name": "bench-llava", "model_family": "other",
                                 "model_lang": ["en"], "model_ability": ["chat", "vision"], "context_length": 2048,
                                 "model_specs": [{"model_format": "pytorch", "model_size_in_billions": 1,
                                                  "quantization": "none", "model_uri": f"file://{folder}"}]})
        c.launch_model(model_name="bench-llava", model_uid="llava", model_format="pytorch")
        handle = c.get_model("llava")
        one = {"max_tokens": 8, "temperature": 0}
        oversized = "whales sing at night " * 190_000  # 3.99 MB, under max_prompt_bytes (4 MiB)

        def refused() -> None:
            try:
                handle.generate(oversized, generate_config=one)
            except ZinferError as exc:
                assert exc.field == "prompt", exc
            else:
                raise AssertionError("a prompt over the context was served")

        cases = {
            "images": (lambda: handle.chat(messages=chat_with(big), generate_config=one),
                       lambda: handle.chat(messages=chat_with(small), generate_config=one)),
            "oversized": (refused, lambda: handle.generate("whales sing at night", generate_config=one)),
        }
        longest_pause(handle, lambda: None)  # warm
        pauses: dict[str, list[float]] = {f"{case}_{side}": [] for case in cases for side in ("heavy", "baseline")}
        for _ in range(args.rounds):  # interleaved, so that a busy moment of the machine hits both sides alike
            for case, (heavy, baseline) in cases.items():
                pauses[f"{case}_heavy"].append(longest_pause(handle, heavy))
                pauses[f"{case}_baseline"].append(longest_pause(handle, baseline))
    finally:
        mesh.stop()
    median = {name: round(statistics.median(values), 1) for name, values in pauses.items()}
    print(f"longest pause of a running stream (median of {args.rounds}) while another request arrives:")
    for case in cases:
        heavy, baseline = median[f"{case}_heavy"], median[f"{case}_baseline"]
        print(f"  {case}: {heavy} ms, against {baseline} ms for its baseline -> {heavy / baseline:.2f}x")
    record("prepare", {"model": "random LLaVA, CLIP 256x4 + Llama 512x8 (transformers)", "pause_ms": median,
                       **{f"ratio_{case}": round(median[f"{case}_heavy"] / median[f"{case}_baseline"], 2)
                          for case in cases}})


if __name__ == "__main__":
    main()

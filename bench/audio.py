"""Speech to text: one 30-second transcription served (through the mesh) against transformers' own
speech-recognition pipeline on the same audio in this process, and 8 concurrent 30-second transcriptions against
the raw pipeline run on them one after another; same run, same model: a random Whisper of whisper-tiny's shape
(width 384, 4 encoder and 4 decoder layers, 39M parameters; each window decodes at most 48 tokens).

    .venv/bin/python bench/audio.py [--rounds 3] [--batch N]
"""

from __future__ import annotations

import statistics
import time

from common import MODELS, arguments, concurrently, record, start_mesh

from zinfer.services.worker.instance.backends.speech_backend import CHUNK_SECONDS, decode_audio
from zinfer.shared.tinyaudio import build_tiny_whisper, tone_wav

BATCH = 2  # the raw pipeline's batch_size: a 30-second file's two windows (5-second strides) in one batch


def main() -> None:
    args = arguments(3, ("--batch", {"type": int, "default": None,
                                     "help": "the served engine's max_batch_size (default: the engine's own)"}),
                     ("--wait-ms", {"type": float, "default": None,
                                    "help": "the served engine's batch_wait_ms (default: the engine's own)"}))
    folder = MODELS / "whisper-tiny-shape"
    if not (folder / "model.safetensors").exists():  # weights at a trained model's scale (large ones overflow)
        build_tiny_whisper(folder, width=384, layers=4, heads=6, init_std=0.02)
    wavs = [tone_wav(30, freq=200 + 40 * i, seed=i) for i in range(8)]

    from transformers import pipeline

    pipe = pipeline("automatic-speech-recognition", model=str(folder), device="cpu")

    def raw_one(i: int) -> str:
        return pipe(decode_audio(wavs[i], 16000), chunk_length_s=CHUNK_SECONDS, batch_size=BATCH,
                    generate_kwargs={"task": "transcribe"})["text"]

    raw_one(0)
    mesh = start_mesh()
    try:
        c = mesh.client
        c.register_model("audio", {"version": 2, "model_name": "bench-whisper", "model_family": "whisper",
                                   "model_ability": ["audio2text"], "multilingual": True,
                                   "model_uri": str(folder)})
        options = {k: v for k, v in (("max_batch_size", args.batch), ("batch_wait_ms", args.wait_ms)) if v is not None}
        c.launch_model(model_name="bench-whisper", model_type="audio", model_uid="whisper", **options)
        clients = [mesh.new_client() for _ in range(8)]
        handles = [cl.get_model("whisper") for cl in clients]
        assert handles[0].transcriptions(wavs[0])["text"] == raw_one(0)  # the same text, or the timing means nothing
        one_raw, one_served, seq_raw, crowd = [], [], [], []
        for _ in range(args.rounds):  # interleaved, so that a busy moment hits both sides alike
            start = time.perf_counter()
            raw_one(0)
            one_raw.append(time.perf_counter() - start)
            start = time.perf_counter()
            handles[0].transcriptions(wavs[0])
            one_served.append(time.perf_counter() - start)
            start = time.perf_counter()
            for i in range(8):
                raw_one(i)
            seq_raw.append(time.perf_counter() - start)
            start = time.perf_counter()
            concurrently(8, lambda i: handles[i].transcriptions(wavs[i]))
            crowd.append(time.perf_counter() - start)
        for cl in clients:
            cl.close()
    finally:
        mesh.stop()
    report = {"model": "random Whisper, whisper-tiny's shape", "audio_s": 30, "max_batch_size": args.batch or "default",
              "batch_wait_ms": "default" if args.wait_ms is None else args.wait_ms,
              "one_raw_s": round(min(one_raw), 3), "one_served_s": round(min(one_served), 3),
              "one_ratio": round(min(one_raw) / min(one_served), 3),
              "eight_raw_sequential_s": round(min(seq_raw), 3), "eight_served_concurrent_s": round(min(crowd), 3),
              "eight_ratio": round(min(seq_raw) / min(crowd), 3),
              "one_served_median_s": round(statistics.median(one_served), 3)}
    print(f"one 30 s transcription: raw pipeline {report['one_raw_s']} s, served {report['one_served_s']} s "
          f"= {report['one_ratio']}x raw (target >= 0.9)")
    print(f"8 concurrent: raw one after another {report['eight_raw_sequential_s']} s, served at once "
          f"{report['eight_served_concurrent_s']} s = {report['eight_ratio']}x (target >= 2)")
    record("audio", report)


if __name__ == "__main__":
    main()

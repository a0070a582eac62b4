"""Speech to text (the `audio` model type, ability audio2text) on transformers' automatic-speech-recognition
pipeline: Whisper-style models (and any model that pipeline runs).

Audio arrives as the file the client sent; it is decoded here with soundfile (WAV, FLAC, MP3, OGG: never handed
to the pipeline as bytes, which would need ffmpeg), mixed down to mono and resampled to the feature extractor's
rate (scipy's polyphase filter). Long audio is cut into 30-second windows with 5-second overlaps on both sides
(the pipeline's chunking, `chunk_length_s`), and one pipeline call runs the windows of several requests together,
`max_batch_size` at a time.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from zinfer.services.worker.instance.backends import reuse
from zinfer.services.worker.instance.backends.base import LoadContext
from zinfer.shared.errors import InvalidRequest

CHUNK_SECONDS = 30  # Whisper's window


def decode_audio(data: bytes, rate: int) -> np.ndarray:
    """A file's samples as float32 mono at `rate` Hz; InvalidRequest naming `file` for what is not audio."""
    import soundfile

    try:
        samples, source_rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile.LibsndfileError, and TypeError/ValueError for what is no format at all
        raise InvalidRequest(f"file: not audio that zinfer can decode (WAV, FLAC, MP3, OGG...): {exc}",
                             field="file") from None
    if samples.size == 0:
        raise InvalidRequest("file: the audio has no samples", field="file")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if source_rate != rate:
        from scipy.signal import resample_poly

        g = math.gcd(int(source_rate), rate)
        mono = resample_poly(mono, rate // g, int(source_rate) // g).astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


class SpeechBackend:
    """A speech-recognition pipeline and what a request may ask of it."""

    def __init__(self, path: str, device: str, multilingual: bool, trust_remote_code: bool = False):
        import torch
        from transformers import pipeline

        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.pipe = pipeline("automatic-speech-recognition", model=path, device=device, dtype=dtype,
                             trust_remote_code=trust_remote_code)
        self.rate = int(self.pipe.feature_extractor.sampling_rate)
        if getattr(self.pipe.model.config, "is_encoder_decoder", False):  # work generate repeats, done once
            reuse.remember_last_encoding(self.pipe.model)
            if not reuse.share_cross_attention(self.pipe.model):
                self.pipe.model._reorder_cache = reuse.reorder_self_attention  # generate's own hook
        config = getattr(self.pipe.model, "generation_config", None)
        self.whisper = config is not None and hasattr(config, "no_timestamps_token_id")
        # English-only Whisper models take no language or task (forcing them breaks their output)
        self.multilingual = multilingual and bool(getattr(config, "is_multilingual", True)) and self.whisper
        self.languages = {k.strip("<|>") for k in (getattr(config, "lang_to_id", None) or {})}

    def decode(self, data: bytes) -> np.ndarray:
        """A request's audio file as this model's samples (InvalidRequest naming `file` for what is not audio)."""
        return decode_audio(data, self.rate)

    def kwargs(self, task: str, language: str | None, prompt: str | None, temperature: float,
               timestamps: str) -> dict[str, Any]:
        """The pipeline's arguments for one request (requests with equal ones run together); InvalidRequest
        naming the field this model cannot do."""
        generate: dict[str, Any] = {}
        if self.multilingual:
            generate["task"] = task
            if language is not None:
                lang = language.lower()
                if self.languages and lang not in self.languages:
                    raise InvalidRequest(f"language {language!r}: this model knows {sorted(self.languages)}",
                                         field="language")
                generate["language"] = lang
        elif task == "translate":
            raise InvalidRequest("this model transcribes English only: it cannot translate (use a multilingual "
                                 "model)", field="model")
        elif language is not None and language.lower() not in ("en", "english"):
            raise InvalidRequest(f"language {language!r}: this model transcribes English only", field="language")
        if temperature > 0:
            generate.update(do_sample=True, temperature=temperature)
        if prompt:
            if not self.whisper:
                raise InvalidRequest("prompt: this model takes no prompt (Whisper models do)", field="prompt")
            generate["prompt_ids"] = self.pipe.tokenizer.get_prompt_ids(prompt, return_tensors="pt")
        out: dict[str, Any] = {"generate_kwargs": generate, "chunk_length_s": CHUNK_SECONDS}
        if timestamps != "none":
            out["return_timestamps"] = "word" if timestamps == "word" else True
        return out

    def transcribe(self, audios: list[np.ndarray], kwargs: dict[str, Any], batch_size: int) -> list[dict]:
        """One pipeline call for several requests' audio (their windows batched `batch_size` at a time)."""
        out = self.pipe(audios if len(audios) > 1 else audios[0], batch_size=batch_size, **kwargs)
        return out if isinstance(out, list) else [out]

    def close(self) -> None:
        self.pipe = None


CPU_CACHE_BUDGET = 1 << 30  # bytes of cross-attention cache a CPU batch of windows may hold by default
BEAMS = 5  # the pipeline's default beam search (as OpenAI's Whisper)


def default_batch(config, device: str) -> int:
    """Windows one pipeline step runs by default: 8 on a GPU; on a CPU as many (2 to 8) as CPU_CACHE_BUDGET of
    cross-attention cache holds at 5 beams (transformers keeps a copy per beam: layers x 2 x 1500 frames x width
    floats each), since a batch there gains only where the steps share work (reuse.py), and a big model's batch of
    8 would hold ~20 GB (Whisper large: 32 layers of width 1280)."""
    if device.startswith("cuda"):
        return 8
    frames = getattr(config, "max_source_positions", 1500)
    per_window = getattr(config, "decoder_layers", 0) * 2 * frames * getattr(config, "d_model", 0) * 4 * BEAMS
    return min(8, max(2, CPU_CACHE_BUDGET // per_window)) if per_window else 2


def load(ctx: LoadContext):
    """The audio engine of an instance: speech to text (a pipeline and its batcher), or text to speech."""
    from zinfer.services.worker.instance.speech_batcher import SpeakBatcher, SpeechBatcher

    if ctx.launch.audio.ability == "text2audio":
        from zinfer.services.worker.instance.backends.tts_backend import SpeakBackend

        speaker = SpeakBackend(ctx.path, ctx.device)
        return speaker, SpeakBatcher(ctx.uid, speaker, ctx.wake, ctx.queue_limit)

    backend = SpeechBackend(ctx.path, ctx.device, ctx.launch.audio.multilingual is not False, ctx.trust_remote_code)
    batch = ctx.option("max_batch_size") or default_batch(backend.pipe.model.config, ctx.device)
    return backend, SpeechBatcher(ctx.uid, backend, ctx.wake, ctx.queue_limit, max_batch_size=batch,
                                  wait_ms=ctx.option("batch_wait_ms"))

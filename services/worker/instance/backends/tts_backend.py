"""Text to speech (the `audio` model type, ability text2audio) on transformers' text-to-speech models that make a
waveform in one forward pass: VITS / MMS-TTS (`VitsModel`). The audio is encoded here with soundfile: WAV, FLAC,
MP3 (libsndfile's LAME), or raw 16-bit PCM."""

from __future__ import annotations

import io
import re
import struct

import numpy as np

from zinfer.shared.errors import InvalidRequest

MEDIA_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav", "flac": "audio/flac", "pcm": "audio/pcm"}


_SENTENCE_END = re.compile(r"(?<=[.!?;:。！？；])\s+|\n+")


def sentences(text: str) -> list[str]:
    """The text in the pieces a streamed speech says one by one: sentences (ended by . ! ? ; : or their CJK
    forms and a space, or a line break)."""
    parts = [part.strip() for part in _SENTENCE_END.split(text)]
    return [part for part in parts if part] or [text]


def wav_stream_header(rate: int) -> bytes:
    """The header of a 16-bit mono WAV of unknown length (its sizes the largest there are), as streamed WAV goes:
    the samples follow as they are made."""
    unknown = struct.pack("<I", 0xFFFFFFFF)
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)  # PCM, mono, 16-bit
    return b"RIFF" + unknown + b"WAVEfmt " + fmt + b"data" + unknown


def encode_audio(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """Mono float samples in [-1, 1] as a file of this format, all by libsndfile (pcm: its RAW format, 16-bit
    little-endian samples with no header: the same samples as the WAV)."""
    import soundfile

    buf = io.BytesIO()
    kind, subtype = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"),
                     "pcm": ("RAW", "PCM_16")}[fmt]
    soundfile.write(buf, np.clip(samples, -1.0, 1.0).astype(np.float32), rate, format=kind, subtype=subtype,
                    endian="LITTLE" if fmt == "pcm" else "FILE")
    return buf.getvalue()


class SpeakBackend:
    """A VITS-style model and its tokenizer: text in, a waveform out (its noise drawn from the request's seed)."""

    def __init__(self, path: str, device: str):
        import torch
        from transformers import AutoModelForTextToWaveform, AutoTokenizer

        self.torch = torch
        self.device = device
        self.model = AutoModelForTextToWaveform.from_pretrained(path).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.rate = int(self.model.config.sampling_rate)
        self.speakers = int(getattr(self.model.config, "num_speakers", 1) or 1)

    def voice(self, voice: str) -> int | None:
        """The speaker id a voice names. A one-voice model speaks with its voice whatever the name (OpenAI's clients
        always send one: "alloy"...); a multi-speaker model takes "0".."n-1" ("" or "default": 0)."""
        if self.speakers == 1:
            return None
        if voice in ("", "default"):
            return 0
        if voice.isdigit() and int(voice) < self.speakers:
            return int(voice)
        raise InvalidRequest(f"voice {voice!r}: this model has the voices 0 to {self.speakers - 1}", field="voice")

    def speak(self, text: str, voice: str, speed: float, seed: int) -> np.ndarray:
        torch = self.torch
        inputs = self.tokenizer(text, return_tensors="pt").to(self.device)
        if inputs["input_ids"].shape[1] == 0:
            raise InvalidRequest("input: nothing this model can say (no character its tokenizer knows)",
                                 field="input")
        speaker = self.voice(voice)
        self.model.speaking_rate = speed
        torch.manual_seed(seed)
        with torch.inference_mode():
            kwargs = {"speaker_id": speaker} if speaker is not None else {}
            waveform = self.model(**inputs, **kwargs).waveform
        return waveform[0].float().cpu().numpy()

    def close(self) -> None:
        self.model = None

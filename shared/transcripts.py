"""OpenAI's audio shapes, for the gateway's /v1/audio/transcriptions, /translations and /speech and the client's
transcriptions() / translations() / speech(): the request's fields checked into a Transcribe (or Speak) message,
and a Transcription written in each response_format (json, text, srt, verbose_json, vtt)."""

from __future__ import annotations

from typing import Any

import msgspec

from zinfer.shared import protocol as p
from zinfer.shared.errors import InvalidRequest
from zinfer.shared.models import closest_name, problem_from_validation

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("segment", "word")
MEDIA_TYPES = {"json": "application/json", "verbose_json": "application/json", "text": "text/plain; charset=utf-8",
               "srt": "application/x-subrip; charset=utf-8", "vtt": "text/vtt; charset=utf-8"}


def transcribe_message(uid: str, audio: bytes, task: str, *, language: str | None = None, prompt: str | None = None,
                       response_format: str | None = "json", temperature: Any = 0.0,
                       timestamp_granularities: list[str] | str | None = None) -> p.Transcribe:
    """The request, checked: InvalidRequest names the field at fault."""
    fmt = response_format or "json"
    if fmt not in RESPONSE_FORMATS:
        raise InvalidRequest(f"response_format {fmt!r} must be one of {', '.join(RESPONSE_FORMATS)}",
                             field="response_format")
    wanted = [timestamp_granularities] if isinstance(timestamp_granularities, str) else \
        list(timestamp_granularities or [])
    bad = [g for g in wanted if g not in GRANULARITIES]
    if bad:
        raise InvalidRequest(f"timestamp_granularities: {bad[0]!r} must be segment or word",
                             field="timestamp_granularities")
    if wanted and fmt != "verbose_json":
        raise InvalidRequest("timestamp_granularities needs response_format verbose_json",
                             field="timestamp_granularities")
    timestamps = "word" if "word" in wanted else "segment" if fmt in ("srt", "vtt", "verbose_json") else "none"
    if isinstance(temperature, str):
        try:
            temperature = float(temperature)
        except ValueError:
            raise InvalidRequest(f"temperature {temperature!r} is not a number", field="temperature") from None
    fields = {"model_uid": uid, "audio": audio, "task": task, "language": language or None,
              "prompt": prompt or None, "temperature": 0.0 if temperature is None else temperature,
              "timestamps": timestamps}
    if not audio:
        raise InvalidRequest("file is required: the audio file (WAV, FLAC, MP3, OGG...)", field="file")
    if len(audio) > p.MAX_AUDIO_BYTES:
        raise InvalidRequest(f"file is {len(audio):,} bytes; at most {p.MAX_AUDIO_BYTES:,}", field="file")
    try:
        return msgspec.convert(fields, p.Transcribe)
    except msgspec.ValidationError as exc:
        problem = problem_from_validation(exc, p.Transcribe)
        raise InvalidRequest(str(problem), field=problem.field or None) from None


def _clock(seconds: float, decimal: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def _cues(reply: p.Transcription) -> list[tuple[float, float, str]]:
    """Timed pieces of text: the segments (the words when only they are timed; the whole text as one cue when
    neither is)."""
    if reply.segments:
        return [(s.start, s.end, s.text.strip()) for s in reply.segments]
    if reply.words:
        return [(w.start, w.end, w.word.strip()) for w in reply.words]
    return [(0.0, reply.duration, reply.text.strip())]


def render(reply: p.Transcription, response_format: str | None) -> tuple[dict | str, str]:
    """(the response: a JSON object, or text; its media type) in OpenAI's response_format."""
    fmt = response_format or "json"
    if fmt == "json":
        return {"text": reply.text}, MEDIA_TYPES[fmt]
    if fmt == "text":
        return reply.text, MEDIA_TYPES[fmt]
    if fmt == "verbose_json":
        out: dict[str, Any] = {"task": reply.task, "language": reply.language, "duration": reply.duration,
                               "text": reply.text}
        if reply.segments is not None:
            out["segments"] = [{"id": s.id, "start": s.start, "end": s.end, "text": s.text}
                               for s in reply.segments]
        if reply.words is not None:
            out["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in reply.words]
        return out, MEDIA_TYPES[fmt]
    if fmt == "srt":
        cues = [f"{i}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{text}\n" for i, (a, b, text) in
                enumerate(_cues(reply), start=1)]
        return "\n".join(cues), MEDIA_TYPES[fmt]
    cues = [f"{_clock(a, '.')} --> {_clock(b, '.')}\n{text}\n" for a, b, text in _cues(reply)]
    return "WEBVTT\n\n" + "\n".join(cues), MEDIA_TYPES["vtt"]


# ---------------------------------------------------------------- text to speech

SPEAK_IGNORED = ("kwargs", "user")  # sent by some clients (xinference-client: kwargs): no effect
SPEAK_FIELDS = ("input", "voice", "response_format", "speed", "seed", "stream", "stream_format")
STREAMED_SPEECH = ("pcm", "wav")  # formats whose sentences can go out one by one (an MP3 or FLAC file is one whole)


def speak_message(uid: str, body: dict) -> p.Speak:
    """OpenAI's speech request body ({model, input, voice, response_format, speed, stream_format}, Xinference's
    stream), checked: InvalidRequest names the field at fault (an unknown field with the closest known name)."""
    fields = {k: v for k, v in body.items() if k not in ("model", *SPEAK_IGNORED)}
    stream_format = fields.pop("stream_format", None)  # OpenAI's: "audio" (the bytes as made) or "sse" (events)
    if fields.get("voice") is None:
        fields.pop("voice", None)
    if fields.get("response_format") is None:
        fields.pop("response_format", None)
    unknown = sorted(set(fields) - set(p.Speak.__struct_fields__) - {"model_uid"})
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: unknown field {closest_name(unknown[0], SPEAK_FIELDS)}".rstrip(),
                             field=unknown[0])
    fmt = fields.get("response_format", "mp3")
    if fmt not in p.SPEECH_FORMATS:
        raise InvalidRequest(f"response_format {fmt!r} must be one of {', '.join(p.SPEECH_FORMATS)}",
                             field="response_format")
    if stream_format is not None:
        if stream_format not in ("audio", "sse"):
            raise InvalidRequest(f"stream_format {stream_format!r} must be 'audio' or 'sse'", field="stream_format")
        fields["stream"] = True
    if fields.get("stream") is None:
        fields.pop("stream", None)
    if fields.get("stream") is True and fmt not in STREAMED_SPEECH:
        raise InvalidRequest(f"response_format {fmt!r} cannot be streamed (a file that is one whole); stream "
                             f"{' or '.join(STREAMED_SPEECH)}, or leave stream off", field="response_format")
    try:
        return msgspec.convert({**fields, "model_uid": uid}, p.Speak)
    except msgspec.ValidationError as exc:
        problem = problem_from_validation(exc, p.Speak)
        raise InvalidRequest(str(problem), field=problem.field or None) from None

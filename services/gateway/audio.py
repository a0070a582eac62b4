"""The gateway's audio routes (OpenAI's): /v1/audio/transcriptions and /translations (a multipart form with the
audio file), and /v1/audio/speech (the audio as the body; streamed a sentence at a time with `stream_format`
audio or sse, or Xinference's `stream`)."""

from __future__ import annotations

import base64

import msgspec
from fastapi import Request
from fastapi.responses import Response

from zinfer.services.gateway.asgi import EventStream, body_of
from zinfer.shared import protocol as p
from zinfer.shared import transcripts
from zinfer.shared.errors import InvalidRequest, ZinferError

_json = msgspec.json.Encoder()


async def transcriptions(gw, request: Request, task: str = "transcribe") -> Response:
    """OpenAI's POST /v1/audio/transcriptions (and /translations: task translate, the text in English): a multipart
    form with the audio `file` and `model`, `language`, `prompt`, `response_format`, `temperature`,
    `timestamp_granularities[]`."""
    conn = gw.connection(request)
    try:
        form = await request.form(max_files=1, max_part_size=p.MAX_AUDIO_BYTES)
    except Exception as exc:  # not multipart, or a part over the limit
        raise InvalidRequest(f"the request must be a multipart form with the audio in `file`: {exc}",
                             field="file") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise InvalidRequest("file is required: the audio file (WAV, FLAC, MP3, OGG...)", field="file")
    audio = await upload.read(p.MAX_AUDIO_BYTES + 1)
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    uid, target = await gw.model_target(conn, {"model": fields.get("model")})
    granularities = form.getlist("timestamp_granularities[]") or form.getlist("timestamp_granularities")
    fmt = fields.get("response_format")
    msg = transcripts.transcribe_message(uid, audio, task, language=fields.get("language"),
                                         prompt=fields.get("prompt"), response_format=fmt,
                                         temperature=fields.get("temperature"),
                                         timestamp_granularities=[g for g in granularities if isinstance(g, str)])
    reply, _ = await gw.ask(conn, target, uid, msg)
    content, media_type = transcripts.render(reply, fmt)
    if isinstance(content, dict):
        return Response(_json.encode(content), media_type="application/json")
    return Response(content, media_type=media_type)


async def speech(gw, request: Request) -> Response:
    """OpenAI's POST /v1/audio/speech: {model, input, voice, response_format, speed, stream_format}; the audio is the
    body, whole, or streamed as each sentence is made (pcm, wav)."""
    conn = gw.connection(request)
    body = await body_of(request)
    uid, target = await gw.model_target(conn, body)
    sse = body.get("stream_format") == "sse"
    msg = transcripts.speak_message(uid, body)
    if not msg.stream:
        reply, _ = await gw.ask(conn, target, uid, msg)
        return Response(reply.audio, media_type=reply.media_type)
    first, chunks = await gw.open_stream(conn, target, uid, msg)  # a refusal keeps its own status
    media_type = "text/event-stream" if sse else first.media_type if first is not None else "audio/pcm"
    return EventStream(_speech_body(gw, first, chunks, sse), media_type)


def _event(obj: dict) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


async def _speech_body(gw, first, chunks, sse: bool):
    """Each sentence's audio as it comes (raw), or OpenAI's speech.audio.delta events (base64) and a
    speech.audio.done."""
    try:
        chunk = first
        while chunk is not None:
            if chunk.audio:
                yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(chunk.audio).decode()}) \
                    if sse else chunk.audio
            chunk = await anext(chunks, None)
        if sse:
            yield _event({"type": "speech.audio.done"})
    except ZinferError as exc:  # mid-stream: the status is sent already; SSE says why, raw audio just ends
        gw.metrics.error(exc)
        if sse:
            yield _event({"type": "error", "error": {"message": str(exc), "param": exc.field, "code": exc.code}})
    finally:
        await chunks.aclose()

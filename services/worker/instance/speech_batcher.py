"""Speech to text on the compute loop: concurrent transcriptions run as one pipeline call.

A request's arguments are checked and its audio decoded when it is submitted (on the I/O thread: a file that is
not audio is refused at once, and decoding never holds the compute loop). Each step takes the queued requests
that share the first one's arguments (task, language, prompt, temperature, timestamps), up to `max_batch_size`,
and runs their 30-second windows together; one that fails (audio that breaks the model) fails alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from zinfer.services.worker.instance.backends.tts_backend import (
    MEDIA_TYPES,
    encode_audio,
    sentences,
    wav_stream_header,
)
from zinfer.services.worker.instance.compute import Job, QueueBatcher
from zinfer.shared import protocol as p
from zinfer.shared.errors import InvalidRequest
from zinfer.shared.serving import Segment, Word


class _Work:
    __slots__ = ("job", "audio", "kwargs", "key")

    def __init__(self, job: Job, audio: np.ndarray, kwargs: dict[str, Any]):
        self.job, self.audio, self.kwargs = job, audio, kwargs
        msg = job.msg
        self.key = (msg.task, msg.language, msg.prompt, msg.temperature, msg.timestamps)


def segments_of(result: dict, duration: float, words: bool) -> tuple[list[Segment] | None, list[Word] | None]:
    """The pipeline's timestamped chunks as segments, or as words (word timestamps); a chunk without an end (the
    model stopped inside it) ends with the audio."""
    chunks = result.get("chunks")
    if chunks is None:
        return None, None
    spans = []
    for chunk in chunks:
        start, end = chunk.get("timestamp") or (None, None)
        spans.append((round(0.0 if start is None else float(start), 3), round(duration if end is None else
                                                                               float(end), 3)))
    if words:
        return None, [Word(word=c["text"], start=a, end=b) for c, (a, b) in zip(chunks, spans, strict=True)]
    return [Segment(id=i, start=a, end=b, text=c["text"]) for i, (c, (a, b)) in enumerate(zip(chunks, spans,
                                                                                           strict=True))], None


class SpeechBatcher(QueueBatcher):
    def __init__(self, uid: str, backend, wake: Callable[[], None], max_queue: int,
                 max_batch_size: int = 8, wait_ms: float = 0.0):
        super().__init__(uid, wake, max_queue, max_batch_size, wait_ms)
        self.backend = backend

    def submit(self, job: Job) -> None:
        msg: p.Transcribe = job.msg
        if not isinstance(msg, p.Transcribe):
            raise InvalidRequest(f"model {self.uid!r} is a speech-to-text model: it cannot speak", field="model_uid")
        kwargs = self.backend.kwargs(msg.task, msg.language, msg.prompt, msg.temperature, msg.timestamps)
        self._enqueue(_Work(job, self.backend.decode(msg.audio), kwargs))

    def step(self) -> None:
        batch: list[_Work] = []
        for work in list(self.queue):
            if work.job.cancelled:
                self.queue.remove(work)
                work.job.drop_cancelled()
                self.stats.cancelled += 1
            elif not batch or (work.key == batch[0].key and len(batch) < self.max_items):
                batch.append(work)
        if not batch:
            return
        self.running = len(batch)  # before they leave the queue: a report never sees them nowhere
        for work in batch:
            self.queue.remove(work)
        try:
            self._transcribe(batch)
        finally:
            self.running = 0

    def _transcribe(self, batch: list[_Work]) -> None:
        self.stats.requests += len(batch)
        try:
            results = self.backend.transcribe([w.audio for w in batch], batch[0].kwargs, self.max_items)
        except Exception as exc:
            if len(batch) == 1:
                self.stats.failures += 1
                batch[0].job.fail(exc)
                return
            results = None  # one of them breaks the model: each on its own, so that only it fails
        for i, work in enumerate(batch):
            try:
                result = results[i] if results is not None else \
                    self.backend.transcribe([work.audio], work.kwargs, self.max_items)[0]
            except Exception as exc:  # this request's audio alone breaks the model: it fails alone
                self.stats.failures += 1
                work.job.fail(exc)
                continue
            self._reply(work, result)

    def _reply(self, work: _Work, result: dict) -> None:
        msg: p.Transcribe = work.job.msg
        duration = round(len(work.audio) / self.backend.rate, 3)
        segments, words = segments_of(result, duration, msg.timestamps == "word")
        work.job.reply(p.Transcription(model=self.uid, text=result["text"], task=msg.task, language=msg.language,
                                       duration=duration, segments=segments, words=words))


class _Speaking(NamedTuple):
    job: Job


class _Stream:
    """A streamed speech in progress: its sentences, and how many have gone out."""

    __slots__ = ("job", "parts", "sent", "samples")

    def __init__(self, job: Job, parts: list[str]):
        self.job, self.parts, self.sent, self.samples = job, parts, 0, 0


class SpeakBatcher(QueueBatcher):
    """Text to speech: one request a step (a VITS forward pass makes the whole waveform), encoded here. A streamed
    request takes one step a sentence, each sentence's audio sent as it is made."""

    def __init__(self, uid: str, backend, wake: Callable[[], None], max_queue: int):
        super().__init__(uid, wake, max_queue, 1, 0.0)
        self.backend = backend
        self.streaming: _Stream | None = None

    def submit(self, job: Job) -> None:
        if not isinstance(job.msg, p.Speak):
            raise InvalidRequest(f"model {self.uid!r} is a text-to-speech model: it cannot transcribe audio",
                                 field="model_uid")
        self.backend.voice(job.msg.voice)  # an unknown voice is refused before it queues
        self._enqueue(_Speaking(job))

    def has_work(self) -> bool:
        return self.streaming is not None or super().has_work()

    def inflight(self) -> int:
        return self.running + (self.streaming is not None)

    def fail_all(self, error: Exception) -> None:
        if self.streaming is not None:
            self.streaming, stream = None, self.streaming
            self.stats.failures += 1
            stream.job.fail(error)
        super().fail_all(error)

    def step(self) -> None:
        self.running = 1
        try:
            if self.streaming is not None:
                self._next_sentence()
            else:
                self._speak(self.queue.popleft().job)
        finally:
            self.running = 0

    def _speak(self, job: Job) -> None:
        if job.cancelled:
            job.drop_cancelled()
            self.stats.cancelled += 1
            return
        self.stats.requests += 1
        msg: p.Speak = job.msg
        if msg.stream:
            self.streaming = _Stream(job, sentences(msg.input))
            self._next_sentence()
            return
        try:
            samples = self.backend.speak(msg.input, msg.voice, msg.speed, msg.seed)
            audio = encode_audio(samples, self.backend.rate, msg.response_format)
        except Exception as exc:
            self.stats.failures += 1
            job.fail(exc)
            return
        job.reply(self._speech(msg, len(samples), audio))

    def _speech(self, msg: p.Speak, samples: int, audio: bytes) -> p.Speech:
        return p.Speech(model=self.uid, media_type=MEDIA_TYPES[msg.response_format], sample_rate=self.backend.rate,
                        samples=samples, audio=audio)

    def _next_sentence(self) -> None:
        stream = self.streaming
        job, msg = stream.job, stream.job.msg
        if job.cancelled:  # the client left mid-stream: no more sentences
            self.streaming = None
            job.drop_cancelled()
            self.stats.cancelled += 1
            return
        part = stream.parts[stream.sent]
        try:
            samples = self.backend.speak(part, msg.voice, msg.speed, msg.seed)
        except InvalidRequest:  # nothing sayable in this piece (punctuation alone): the next one
            samples = np.zeros(0, np.float32)
        except Exception as exc:
            self.streaming = None
            self.stats.failures += 1
            job.fail(exc)
            return
        audio = encode_audio(samples, self.backend.rate, "pcm") if len(samples) else b""
        if msg.response_format == "wav" and stream.sent == 0:
            audio = wav_stream_header(self.backend.rate) + audio
        stream.sent += 1
        stream.samples += len(samples)
        last = stream.sent == len(stream.parts)
        if last and not stream.samples:
            self.streaming = None
            self.stats.failures += 1
            job.fail(InvalidRequest("input: nothing this model can say (no character its tokenizer knows)",
                                    field="input"))
            return
        reply = self._speech(msg, len(samples), audio)
        if last:
            self.streaming = None
            job.reply(reply)
        elif audio:
            job.partial(reply)

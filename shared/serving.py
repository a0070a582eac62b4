"""The bus messages of serving a model: the requests a model instance answers (generate, chat, render a chat,
embed, rerank, transcribe, speak) and their replies. shared/protocol.py puts them in its unions and tables."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from zinfer.shared.message import Msg
from zinfer.shared.payloads import (
    ChatChoice,
    ChatDeltaChoice,
    ChatMessage,
    ChatOptions,
    CompletionChoice,
    GenerateConfig,
    Usage,
)


class Generate(Msg, kw_only=True):
    model_uid: str
    prompt: str
    config: GenerateConfig = msgspec.field(default_factory=GenerateConfig)


class Chat(Msg, kw_only=True):
    model_uid: str
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    config: GenerateConfig = msgspec.field(default_factory=GenerateConfig)
    options: ChatOptions = msgspec.field(default_factory=ChatOptions)


class RenderChat(Msg, kw_only=True):
    """The prompt a chat would get (the model's template with these messages and tools) and its token ids,
    without generating: for people debugging templates."""

    model_uid: str
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    options: ChatOptions = msgspec.field(default_factory=ChatOptions)


class Embed(Msg, kw_only=True):
    model_uid: str
    input: list[str]
    # Fewer dimensions than the model makes: each vector cut to its first `dimensions` and renormalised, for
    # models whose vectors are unit length (the worker refuses it for others).
    dimensions: Annotated[int, Meta(ge=1)] | None = None


class Rerank(Msg, kw_only=True):
    """Score each document's relevance to the query; the reply lists them best first, cut to top_n."""
    model_uid: str
    query: str
    documents: list[str]
    top_n: Annotated[int, Meta(ge=1)] | None = None


# ---------------------------------------------------------------- replies

class _Completions(Msg, kw_only=True):
    """What OpenAI's completion replies share; each adds its `object` and its `choices`."""

    id: str
    object: str
    created: int
    model: str
    usage: Usage | None = None


class Completion(_Completions, kw_only=True):
    object: str = "text_completion"
    choices: list[CompletionChoice]


class ChatCompletion(_Completions, kw_only=True):
    object: str = "chat.completion"
    choices: list[ChatChoice]


class ChatCompletionChunk(_Completions, kw_only=True):
    object: str = "chat.completion.chunk"
    choices: list[ChatDeltaChoice]


class RenderedChat(Msg, kw_only=True):
    model: str
    prompt: str
    token_ids: list[int]
    template_source: str  # where the template came from: registration, family, prompt_style, model


class Embedding(Msg, kw_only=True):
    """Embeddings travel as one raw float32 frame (rows x dimensions) after the body, not as lists."""

    model: str
    rows: int
    dimensions: int
    prompt_tokens: int


class RerankItem(Struct, array_like=True):
    index: int  # the document's place in the request
    relevance_score: float


class RerankResult(Msg, kw_only=True):
    model: str
    results: list[RerankItem]  # best first, at most top_n
    input_tokens: int  # the query-document pairs' tokens, as the model saw them (truncated at max_tokens)


# ---------------------------------------------------------------- speech to text

MAX_AUDIO_BYTES = 25 << 20  # OpenAI's limit for an audio file


class Transcribe(Msg, kw_only=True):
    """Speech to text (OpenAI's /v1/audio/transcriptions and /translations): the audio file as it was sent (WAV,
    FLAC, MP3, OGG...: the instance decodes it), the text in its own language or, with task translate, in
    English. `timestamps`: segment (verbose_json, srt, vtt) or word timestamps as well as the text."""

    model_uid: str
    audio: Annotated[bytes, Meta(min_length=1, max_length=MAX_AUDIO_BYTES)]
    task: Literal["transcribe", "translate"] = "transcribe"
    language: Annotated[str, Meta(min_length=2, max_length=32)] | None = None
    prompt: Annotated[str, Meta(max_length=4096)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1)] = 0.0
    timestamps: Literal["none", "segment", "word"] = "none"


class Segment(Struct, kw_only=True):
    id: int
    start: float  # seconds from the start of the audio
    end: float
    text: str


class Word(Struct, kw_only=True):
    word: str
    start: float
    end: float


class Transcription(Msg, kw_only=True):
    model: str
    text: str
    task: str = "transcribe"
    language: str | None = None  # as asked (None: the model's own choice)
    duration: float = 0.0  # seconds of audio
    segments: list[Segment] | None = None
    words: list[Word] | None = None


# ---------------------------------------------------------------- text to speech

SPEECH_FORMATS = ("mp3", "wav", "flac", "pcm")


class Speak(Msg, kw_only=True):
    """Text to speech (OpenAI's /v1/audio/speech): the audio, encoded in the instance (pcm: 16-bit little-endian
    samples, mono, at the model's rate). `seed` makes a sampling model's voice repeatable (VITS draws noise).
    `stream` (pcm and wav): the text is spoken a sentence at a time, each sentence's audio a Speech of its own as
    soon as it is made (wav: the first carries a header whose sizes say "unknown length")."""

    model_uid: str
    input: Annotated[str, Meta(min_length=1, max_length=4096)]
    voice: Annotated[str, Meta(max_length=64)] = ""
    response_format: Literal["mp3", "wav", "flac", "pcm"] = "mp3"
    speed: Annotated[float, Meta(ge=0.25, le=4.0)] = 1.0
    seed: int = 0
    stream: bool = False


class Speech(Msg, kw_only=True):
    """The audio (streamed: one sentence's; `samples` counts this message's)."""

    model: str
    media_type: str
    sample_rate: int
    samples: int
    audio: bytes

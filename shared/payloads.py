"""The OpenAI-shaped parts of generate, chat and embed: sampling settings and messages in, choices, logprobs and
usage out. Plain structs; shared/protocol.py wraps them in its request and reply messages."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct


class ResponseFormat(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema (llama.cpp: a grammar)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None  # OpenAI: {"name": ..., "schema": {...}, "strict": ...}
    schema: dict[str, Any] | None = None  # the schema itself (vLLM's and llama.cpp's spelling)


class StreamOptions(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    include_usage: bool = False


class GenerateConfig(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False
    repetition_penalty: Annotated[float, Meta(gt=0)] | None = None
    # How long a stream may gather tokens into one chunk (ms); 0 sends every token as it comes.
    stream_interval_ms: Annotated[float, Meta(ge=0)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    n: Annotated[int, Meta(ge=1, le=16)] = 1  # choices, each its own sequence
    # Completions: how many top alternatives each token's logprob comes with (0-20). Chat: true/false, with
    # top_logprobs for the alternatives.
    logprobs: bool | Annotated[int, Meta(ge=0, le=20)] | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False  # completions: the prompt comes first in the text
    min_tokens: Annotated[int, Meta(ge=0)] | None = None  # no end token before this many
    ignore_eos: bool = False  # go on past end tokens (to max_tokens or a stop word)
    response_format: ResponseFormat | None = None
    stream_options: StreamOptions | None = None


class ChatMessage(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    role: str
    content: str
    name: str | None = None


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(Struct, kw_only=True):
    """OpenAI's completions logprobs: per token its text, its logprob, the top alternatives, its text offset."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(Struct, kw_only=True):
    """OpenAI's chat logprobs."""

    content: list[TokenLogprob] | None = None


class CompletionChoice(Struct, kw_only=True):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionMessage(Struct, kw_only=True, omit_defaults=True):
    role: str | None = "assistant"
    content: str | None = None


class ChatChoice(Struct, kw_only=True):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatDeltaChoice(Struct, kw_only=True):
    index: int = 0
    delta: ChatCompletionMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


# ---------------------------------------------------------------- launch options

EngineValue = str | int | float | bool | None


class EngineOptions(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """The launch options an engine takes (Xinference passes them as extra launch keyword arguments). Unknown
    names are refused; none of them loads code. `trust_remote_code` is honoured only for models an operator
    lists in the `trust_remote_code_models` setting."""

    trust_remote_code: bool | None = None
    # requests one instance holds (queued and running) before it answers queue_full (Xinference's
    # request_limits; default: the worker's instance_queue setting)
    request_limits: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    # generation: decode concurrent requests together (default on; off runs them one at a time, in order)
    continuous_batching: bool | None = None
    # transformers: sequences decoded together (default 64)
    max_sequences: Annotated[int, Meta(ge=1, le=4096)] | None = None
    # llama.cpp: context window of each sequence (default: the registration's context_length), CPU threads,
    # and sequences decoded together (default: what 512 MiB of KV cache holds, <= 16)
    n_ctx: Annotated[int, Meta(ge=16, le=1 << 20)] | None = None
    n_threads: Annotated[int, Meta(ge=1, le=1024)] | None = None
    n_parallel: Annotated[int, Meta(ge=1, le=256)] | None = None
    # embeddings and rerank: texts (pairs) and padded tokens per batch, and how long a batch may wait for more requests
    batch_wait_ms: Annotated[float, Meta(ge=0, le=1000)] | None = None
    max_batch_size: Annotated[int, Meta(ge=1, le=65536)] | None = None
    max_batch_tokens: Annotated[int, Meta(ge=1)] | None = None

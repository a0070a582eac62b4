"""The OpenAI-shaped parts of generate, chat and embed: sampling settings and messages in, choices, logprobs and
usage out. Plain structs; shared/protocol.py wraps them in its request and reply messages."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct


class ResponseFormat(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema (llama.cpp: a grammar)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None  # OpenAI: {"name": ..., "schema": {...}, "strict": ...}
    schema: dict[str, Any] | None = None  # the schema itself (vLLM's and llama.cpp's spelling)


class StreamOptions(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    include_usage: bool = False


LORA_SCALE_MAX = 4.0  # an adapter's strength: 0 (off) to 4x what it was trained with
LORA_NAME = r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z"  # no ':' (the OpenAI model field reads UID:ADAPTER)


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
    # Constrained decoding as vLLM and Xinference spell it (one of these, or response_format, at a time): JSON
    # matching a schema, a regular expression, one of a list of strings, a grammar (GBNF or Lark).
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Meta(min_length=1)] | None = None
    guided_grammar: str | None = None
    # LoRA: the adapter of the model's that answers (Xinference's generate_config.lora_name; None: the base model),
    # and its strength where the engine takes one per request (llama.cpp; default: the adapter's launch scale)
    lora_name: str | None = None
    lora_scale: Annotated[float, Meta(ge=0, le=LORA_SCALE_MAX)] | None = None


class FunctionDef(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"\A[A-Za-z0-9_.:-]+\Z")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema (checked when the request is parsed)
    strict: bool | None = None


class Tool(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """OpenAI's tool: a function the model may call."""

    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionCall(Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None  # a JSON object as text, as OpenAI sends it


class ToolCall(Struct, kw_only=True, omit_defaults=True):
    """A call the model made (message.tool_calls), or a piece of one in a stream (with its index)."""

    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall
    index: int | None = None


class ChatOptions(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """What a chat request asks of the template and the answer's shape, beside the sampling settings."""

    # the tools as the client wrote them (their keys in its order, which a template's tojson keeps); each was
    # checked as a Tool
    tools: list[dict[str, Any]] | None = None
    # "auto" (parse calls), "none" (no calls), "required" (at least one call), or a function's name.
    tool_choice: str = "auto"
    tool_choice_named: bool = False  # tool_choice names a function
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] = {}
    add_generation_prompt: bool = True

    def typed_tools(self) -> list[Tool]:
        import msgspec

        return msgspec.convert(self.tools or [], list[Tool])


class TextPart(Struct, tag="text", forbid_unknown_fields=True):
    text: str


class ImagePart(Struct, tag="image", forbid_unknown_fields=True):
    """An image of a message, as the file's bytes (PNG, JPEG, ...; fetched and checked where the request came
    in), and where the request put it (messages[i].content[j]) for errors about it."""

    data: bytes
    where: str


class ChatMessage(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    role: str
    content: str | None = ""  # the text (a list of text parts joined with newlines)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    reasoning_content: str | None = None  # an assistant's earlier reasoning (templates may show or drop it)
    parts: list[TextPart | ImagePart] | None = None  # content with images: its parts in order (None: text only)

    def images(self) -> list[ImagePart]:
        return [part for part in self.parts or () if isinstance(part, ImagePart)]

    def as_template_dict(self) -> dict[str, Any]:
        """The message as transformers' apply_chat_template sees it: arguments as objects where they parse; a
        message with images as a list of parts ({"type": "text", "text"} and {"type": "image"}), in order."""
        out: dict[str, Any] = {"role": self.role}
        if self.parts is not None:
            out["content"] = [{"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "image"}
                              for part in self.parts]
        elif self.content is not None:
            out["content"] = self.content
        for name in ("name", "tool_call_id", "reasoning_content"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                arguments: Any = call.function.arguments
                try:
                    arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
                except ValueError:
                    pass
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            out["tool_calls"] = calls
        return out


class CompletionTokensDetails(Struct, kw_only=True):
    reasoning_tokens: int = 0


class Usage(Struct, kw_only=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails | None = None


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
    # the reasoning text between the model's reasoning tags, under both names clients read
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None


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
    # llama.cpp: the multimodal projector (mmproj .gguf beside the model file) a vision model sees images with
    # (default: its spec's first multimodal_projectors entry when the model has the vision ability)
    multimodal_projector: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    # embeddings and rerank: texts (pairs) and padded tokens per batch, and how long a batch may wait for more requests
    batch_wait_ms: Annotated[float, Meta(ge=0, le=1000)] | None = None
    max_batch_size: Annotated[int, Meta(ge=1, le=65536)] | None = None
    max_batch_tokens: Annotated[int, Meta(ge=1)] | None = None


class LoraAdapter(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """One LoRA adapter of a launch (Xinference's lora_list entry): a PEFT folder (transformers) or a GGUF LoRA
    file (llama.cpp) on the worker's host, or a Hub repository id, downloaded like a model."""

    lora_name: Annotated[str, Meta(pattern=LORA_NAME)]
    local_path: Annotated[str, Meta(min_length=1, max_length=4096)]
    # its strength (llama.cpp's --lora-scaled; Xinference's LoRA.lora_scale): requests may ask for another
    lora_scale: Annotated[float, Meta(ge=0, le=LORA_SCALE_MAX)] = 1.0


class PeftModelConfig(Struct, kw_only=True, omit_defaults=True):
    """Xinference's peft_model_config: the adapters a launch loads (its image_lora_* keys are for image models)."""

    lora_list: list[LoraAdapter] | None = None
    image_lora_load_kwargs: dict[str, Any] | None = None
    image_lora_fuse_kwargs: dict[str, Any] | None = None

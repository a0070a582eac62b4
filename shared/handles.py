"""Model handles returned by Client.get_model: generate, chat, create_embedding and rerank (Xinference's calls)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from zinfer.shared import compat, transcripts
from zinfer.shared import protocol as p
from zinfer.shared.buscore import (
    DESCRIBE,
    WAKE,
    WAKES,
    as_plain,
    drive,
    embedding_array,
    embedding_result,
    recover,
    rerank_result,
)
from zinfer.shared.errors import InvalidRequest, ZinferError
from zinfer.shared.images import ImagePolicy
from zinfer.shared.payloads import GenerateConfig

if TYPE_CHECKING:  # the client imports this module (get_model); this one needs the class for its types only
    import numpy as np

    from zinfer.shared.client import Client


def _config(generate_config: dict | None) -> GenerateConfig:
    return compat.generate_config(generate_config)


class _Handle:
    def __init__(self, client: Client, model_uid: str):
        self.client = client
        self.model_uid = model_uid

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_uid!r})"

    def _target(self) -> bytes:
        return p.model_target(self.model_uid).encode()

    def _stream(self, msg: p.Msg, timeout: float | None) -> Iterator[p.Msg]:
        """A streamed request's messages; an unloaded instance is loaded on request first."""
        for attempt in range(WAKES + 1):
            chunks = self.client.stream(self._target(), msg, timeout)
            started = False
            try:
                for chunk in chunks:
                    started = True
                    yield chunk
                return
            except ZinferError as exc:
                self._recover(exc, WAKES if started else attempt)  # a stream that had begun is not sent again
            finally:
                chunks.close()  # leaving early cancels the work on the worker

    def _perform(self, step: str):
        """One step of the bus core's recover() policy, on this client."""
        if step == DESCRIBE:
            return self.client.call(p.SCHEDULER, p.DescribeModel(model_uid=self.model_uid)).model
        if step == WAKE:
            return self.client.call(p.SCHEDULER, p.WakeModel(model_uid=self.model_uid))
        return self.client.wait_model(self.model_uid, self.client.settings.launch_timeout)

    def _recover(self, exc: ZinferError, attempt: int) -> None:
        """Returns when the request should go again (its unloaded instance was loaded on request); else raises
        the error, explained."""
        error = drive(recover(self.model_uid, exc, attempt, "model_uid"), self._perform)
        if error is not None:
            raise error from None

    def _call(self, msg: p.Msg, timeout: float | None):
        for attempt in range(WAKES + 1):  # an unloaded instance: loaded on request, then the request again
            try:
                return self.client.call_with_buffers(self._target(), msg, timeout)
            except ZinferError as exc:
                self._recover(exc, attempt)

    def rerank(self, *args, **_kwargs) -> dict:
        raise InvalidRequest(f"model {self.model_uid!r} is not a rerank model: it cannot rerank; launch one with "
                             "--model-type rerank", field="model_uid")

    def transcriptions(self, *args, **_kwargs) -> dict:
        raise InvalidRequest(f"model {self.model_uid!r} is not an audio model: it cannot transcribe or speak; "
                             "launch one with --model-type audio", field="model_uid")

    translations = speech = transcriptions

    def create_embedding(self, input: str | list[str], timeout: float | None = None, *,
                         dimensions: int | None = None, encoding_format: str = "float") -> dict:
        """OpenAI's embeddings response; `dimensions` cuts unit-length vectors to fewer (renormalised);
        encoding_format "base64" gives each vector as the base64 of its float32 bytes."""
        if encoding_format not in ("float", "base64"):
            raise InvalidRequest(f"encoding_format {encoding_format!r} must be float or base64",
                                 field="encoding_format")
        texts = [input] if isinstance(input, str) else list(input)
        reply, frames = self._call(p.Embed(model_uid=self.model_uid, input=texts, dimensions=dimensions), timeout)
        return embedding_result(self.model_uid, reply, embedding_array(reply, frames), encoding_format)

    def embed_array(self, input: str | list[str], timeout: float | None = None, *,
                    dimensions: int | None = None) -> np.ndarray:
        """Embeddings as one float32 array (rows x dimensions), without building Python lists."""
        texts = [input] if isinstance(input, str) else list(input)
        reply, frames = self._call(p.Embed(model_uid=self.model_uid, input=texts, dimensions=dimensions), timeout)
        return embedding_array(reply, frames)


class _NotLLM(_Handle):
    """A model that cannot generate or chat: those calls (and the calls of other model types) say what it is and
    what to use instead (typed), instead of failing inside."""

    kind = ""  # "an embedding", "a rerank"
    use = ""  # the call to use instead

    def not_llm(self, call: str) -> InvalidRequest:
        return InvalidRequest(f"model {self.model_uid!r} is {self.kind} model: it cannot {call}; use {self.use}",
                              field="model_uid")

    def generate(self, *args, **_kwargs):
        raise self.not_llm("generate")

    def chat(self, *args, **_kwargs):
        raise self.not_llm("chat")


class EmbeddingHandle(_NotLLM):
    """An embedding model: create_embedding only."""

    kind, use = "an embedding", "create_embedding (zinfer embed), or launch an LLM"

    def rerank(self, *args, **_kwargs):
        raise self.not_llm("rerank")


class RerankHandle(_NotLLM):
    """A rerank model: rerank only (Xinference's RerankModelHandle)."""

    kind, use = "a rerank", "rerank (zinfer rerank)"

    def rerank(self, documents: list[str], query: str, top_n: int | None = None, return_documents: bool = False,
               return_len: bool = False, timeout: float | None = None, **kwargs) -> dict:
        """The documents' relevance to the query, best first: {id, results: [{index, relevance_score,
        document}], meta}; `top_n` keeps the best n."""
        body = compat.rerank_body({"model": self.model_uid, "query": query, "documents": documents, "top_n": top_n,
                                   "return_documents": return_documents, "return_len": return_len, **kwargs})
        reply, _ = self._call(body.message(), timeout)
        return rerank_result(reply, body.texts, body.return_documents, body.return_len)

    def create_embedding(self, *args, **_kwargs):
        raise self.not_llm("embed")

    embed_array = create_embedding


class AudioHandle(_NotLLM):
    """An audio model: speech to text (Xinference's AudioModelHandle: transcriptions, translations)."""

    kind, use = "an audio", "transcriptions or speech (zinfer transcribe, zinfer speak)"

    def transcriptions(self, audio: bytes, language: str | None = None, prompt: str | None = None,
                       response_format: str = "json", temperature: float = 0, timestamp_granularities=None,
                       timeout: float | None = None, task: str = "transcribe") -> dict | str:
        """The audio file's text: a dict for response_format json ({"text"}) and verbose_json (with segments or
        words), the text itself for text, srt and vtt."""
        msg = transcripts.transcribe_message(self.model_uid, audio, task, language=language, prompt=prompt,
                                             response_format=response_format, temperature=temperature,
                                             timestamp_granularities=timestamp_granularities)
        reply, _ = self._call(msg, timeout)
        return transcripts.render(reply, response_format)[0]

    def speech(self, input: str, voice: str = "", response_format: str = "mp3", speed: float = 1.0,
               stream: bool = False, timeout: float | None = None, **kwargs) -> bytes | Iterator[bytes]:
        """The text spoken (a text-to-speech model): the file's bytes in response_format (mp3, wav, flac, pcm);
        stream=True (pcm, wav): an iterator of the audio's bytes, a sentence at a time as each is made."""
        msg = transcripts.speak_message(self.model_uid, {"input": input, "voice": voice, "stream": stream,
                                                         "response_format": response_format, "speed": speed, **kwargs})
        if msg.stream:
            return (chunk.audio for chunk in self._stream(msg, timeout) if chunk.audio)
        reply, _ = self._call(msg, timeout)
        return reply.audio

    def translations(self, audio: bytes, language: str | None = None, prompt: str | None = None,
                     response_format: str = "json", temperature: float = 0, timestamp_granularities=None,
                     timeout: float | None = None) -> dict | str:
        """The audio's speech in English (multilingual models)."""
        return self.transcriptions(audio, language, prompt, response_format, temperature, timestamp_granularities,
                                   timeout, task="translate")

    def create_embedding(self, *args, **_kwargs):
        raise self.not_llm("embed")

    embed_array = create_embedding


class LLMHandle(_Handle):
    def _run(self, msg: p.Msg, stream: bool, timeout: float | None):
        if stream:
            return self._chunks(msg, timeout)
        return as_plain(self._call(msg, timeout)[0])

    def _chunks(self, msg: p.Msg, timeout: float | None) -> Iterator[dict]:
        return (as_plain(chunk) for chunk in self._stream(msg, timeout))

    def generate(self, prompt: str, generate_config: dict | None = None,
                 timeout: float | None = None) -> dict | Iterator[dict]:
        cfg = _config(generate_config)
        return self._run(p.Generate(model_uid=self.model_uid, prompt=prompt, config=cfg), cfg.stream, timeout)

    def chat(self, messages: list[dict] | str | None = None, tools: list[dict] | None = None,
             generate_config: dict | None = None, timeout: float | None = None, *, tool_choice=None,
             parallel_tool_calls: bool | None = None, chat_template_kwargs: dict | None = None,
             enable_thinking: bool | None = None, prompt: str | None = None, system_prompt: str | None = None,
             chat_history: list[dict] | None = None) -> dict | Iterator[dict]:
        """chat(messages=[{role, content}, ...], tools=[...], generate_config={...}) as xinference-client's; the
        answer's message carries tool_calls and reasoning_content where the model gave them. The older
        chat(prompt, system_prompt, chat_history) works too. Chat fields may also come inside generate_config."""
        if isinstance(tools, dict) and generate_config is None:  # chat(messages, {"max_tokens": ...}): the old order
            tools, generate_config = None, tools
        msg = self._chat(messages, tools, generate_config, tool_choice, parallel_tool_calls, chat_template_kwargs,
                         enable_thinking, prompt, system_prompt, chat_history)
        return self._run(msg, msg.config.stream, timeout)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, *, chat_template_kwargs:
                    dict | None = None, enable_thinking: bool | None = None, timeout: float | None = None) -> dict:
        """The prompt the model's template makes of these messages and tools, and its token ids, without
        generating: {model, prompt, token_ids, template_source}."""
        msg = self._chat(messages, tools, None, None, None, chat_template_kwargs, enable_thinking, None, None, None)
        return as_plain(self._call(p.RenderChat(model_uid=self.model_uid, messages=msg.messages,
                                                options=msg.options), timeout)[0])

    def _chat(self, messages, tools, generate_config, tool_choice, parallel_tool_calls, chat_template_kwargs,
              enable_thinking, prompt, system_prompt, chat_history) -> p.Chat:
        if isinstance(messages, str):
            prompt, messages = messages, None
        if messages is None:
            if prompt is None:
                raise InvalidRequest("chat needs messages (or a prompt)", field="messages")
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
                list(chat_history or []) + [{"role": "user", "content": prompt}]
        fields = {**(generate_config or {}), "messages": messages}
        for name, value in (("tools", tools), ("tool_choice", tool_choice), ("parallel_tool_calls",
                            parallel_tool_calls), ("chat_template_kwargs", chat_template_kwargs),
                            ("enable_thinking", enable_thinking)):
            if value is not None:
                fields[name] = value
        return compat.chat_request(self.model_uid, fields, ImagePolicy.from_settings(self.client.settings))


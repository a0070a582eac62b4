"""Model handles returned by Client.get_model: generate, chat and create_embedding (Xinference's calls)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np

from shared import protocol as p
from shared.client import Client, as_plain
from shared.errors import InvalidRequest


def _config(generate_config: dict | None) -> p.GenerateConfig:
    try:
        return msgspec.convert(generate_config or {}, p.GenerateConfig)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"generate_config: {exc}", field="generate_config") from None


def _embed_result(client_uid: str, reply: p.Embedding, frames) -> dict:
    vectors = np.frombuffer(frames[0].buffer, dtype=np.float32).reshape(reply.rows, reply.dimensions)
    return {
        "object": "list",
        "model": client_uid,
        "data": [{"index": i, "object": "embedding", "embedding": vectors[i].tolist()}
                 for i in range(reply.rows)],
        "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens},
    }


class _Handle:
    def __init__(self, client: Client, model_uid: str):
        self.client = client
        self.model_uid = model_uid

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_uid!r})"

    def _target(self) -> bytes:
        return p.model_target(self.model_uid).encode()

    def create_embedding(self, input: str | list[str], timeout: float | None = None) -> dict:
        texts = [input] if isinstance(input, str) else list(input)
        reply, frames = self.client.call_with_buffers(self._target(), p.Embed(model_uid=self.model_uid,
                                                                              input=texts), timeout)
        return _embed_result(self.model_uid, reply, frames)

    def embed_array(self, input: str | list[str], timeout: float | None = None) -> np.ndarray:
        """Embeddings as one float32 array (rows x dimensions), without building Python lists."""
        texts = [input] if isinstance(input, str) else list(input)
        reply, frames = self.client.call_with_buffers(self._target(), p.Embed(model_uid=self.model_uid,
                                                                              input=texts), timeout)
        return np.frombuffer(frames[0].buffer, dtype=np.float32).reshape(reply.rows, reply.dimensions)


class EmbeddingHandle(_Handle):
    pass


class LLMHandle(_Handle):
    def _run(self, msg: p.Msg, stream: bool, timeout: float | None):
        if stream:
            return (as_plain(chunk) for chunk in self.client.stream(self._target(), msg, timeout))
        return as_plain(self.client.call(self._target(), msg, timeout))

    def generate(self, prompt: str, generate_config: dict | None = None,
                 timeout: float | None = None) -> dict | Iterator[dict]:
        cfg = _config(generate_config)
        return self._run(p.Generate(model_uid=self.model_uid, prompt=prompt, config=cfg), cfg.stream, timeout)

    def chat(self, messages: list[dict] | str | None = None, generate_config: dict | None = None,
             timeout: float | None = None, *, prompt: str | None = None, system_prompt: str | None = None,
             chat_history: list[dict] | None = None) -> dict | Iterator[dict]:
        """chat(messages=[{role, content}, ...]); the older chat(prompt, system_prompt, chat_history) too."""
        if isinstance(messages, str):
            prompt, messages = messages, None
        if messages is None:
            if prompt is None:
                raise InvalidRequest("chat needs messages (or a prompt)", field="messages")
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
                list(chat_history or []) + [{"role": "user", "content": prompt}]
        try:
            msgs = msgspec.convert(messages, list[p.ChatMessage])
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"messages: {exc}", field="messages") from None
        cfg = _config(generate_config)
        return self._run(p.Chat(model_uid=self.model_uid, messages=msgs, config=cfg), cfg.stream, timeout)


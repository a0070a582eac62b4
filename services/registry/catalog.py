"""Built-in model families and prompt styles, read from configs/ (no weights needed to list them)."""

from __future__ import annotations

import json
from functools import lru_cache

import msgspec

from zinfer.shared.config import CONFIG_DIR
from zinfer.shared.models import (
    EmbeddingFamily,
    LLMFamily,
    PromptStyle,
    RerankFamily,
    parse_embedding,
    parse_llm,
    parse_rerank,
)


@lru_cache(maxsize=1)
def prompt_styles() -> dict[str, PromptStyle]:
    raw = json.loads((CONFIG_DIR / "prompt_styles.json").read_text())
    return {name: msgspec.convert(style, PromptStyle) for name, style in raw.items()}


@lru_cache(maxsize=1)
def builtin_llms() -> dict[str, LLMFamily]:
    raw = json.loads((CONFIG_DIR / "builtin_llm.json").read_text())
    return {d["model_name"]: parse_llm(d) for d in raw}


@lru_cache(maxsize=1)
def builtin_embeddings() -> dict[str, EmbeddingFamily]:
    raw = json.loads((CONFIG_DIR / "builtin_embedding.json").read_text())
    return {d["model_name"]: parse_embedding(d) for d in raw}


@lru_cache(maxsize=1)
def builtin_reranks() -> dict[str, RerankFamily]:
    raw = json.loads((CONFIG_DIR / "builtin_rerank.json").read_text())
    return {d["model_name"]: parse_rerank(d) for d in raw}


def builtins(model_type: str) -> dict:
    return {"LLM": builtin_llms, "embedding": builtin_embeddings, "rerank": builtin_reranks}[model_type]()


def resolve_prompt_style(family: LLMFamily) -> PromptStyle | None:
    """The prompt style a model chats with: its own, else its built-in family's."""
    style = family.prompt_style
    if style is None and family.model_family in builtin_llms():
        style = builtin_llms()[family.model_family].prompt_style
    if isinstance(style, str):
        return prompt_styles().get(style)
    return style


def family_chat_template(family: LLMFamily) -> str | None:
    if family.chat_template:
        return family.chat_template
    parent = builtin_llms().get(family.model_family)
    return parent.chat_template if parent else None

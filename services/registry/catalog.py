"""Built-in model families and prompt styles, read from configs/ (no weights needed to list them)."""

from __future__ import annotations

import json
from functools import lru_cache

import msgspec

from zinfer.shared.config import CONFIG_DIR
from zinfer.shared.models import (
    AudioFamily,
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


# Built-in families whose chat template is another family's file in configs/templates/ (else <model_name>.jinja).
SHARED_TEMPLATES = {"llama-3.2-instruct": "llama-3.1-instruct", "llama-3.3-instruct": "llama-3.1-instruct",
                    "deepseek-r1-distill-llama": "deepseek-r1-distill-qwen"}


@lru_cache(maxsize=1)
def builtin_llms() -> dict[str, LLMFamily]:
    """The built-in LLM families (configs/builtin_llm.json); a family without a chat_template there takes
    configs/templates/<its name>.jinja when there is one (kept apart: templates read better as files)."""
    raw = json.loads((CONFIG_DIR / "builtin_llm.json").read_text())
    for d in raw:
        file = CONFIG_DIR / "templates" / f"{SHARED_TEMPLATES.get(d['model_name'], d['model_name'])}.jinja"
        if not d.get("chat_template") and file.is_file():
            d["chat_template"] = file.read_text()
    return {d["model_name"]: parse_llm(d) for d in raw}


INHERITED = ("tool_parser", "reasoning_start_tag", "reasoning_end_tag")  # v2 fields a family passes on


def resolved(family: LLMFamily) -> LLMFamily:
    """An LLM definition made self-contained for the workers: what it leaves out of its built-in model_family's
    chat template (or prompt style), stops, stop ids, tool parser and reasoning tags, taken from that family."""
    parent = builtin_llms().get(family.model_family)
    changes: dict = {"prompt_style": resolve_prompt_style(family), "chat_template": family_chat_template(family)}
    if parent is not None:
        if family.stop is None and family.stop_token_ids is None:
            changes.update(stop=parent.stop, stop_token_ids=parent.stop_token_ids)
        extras = {k: v for k, v in parent.v2_extras.items() if k in INHERITED}
        changes["v2_extras"] = {**extras, **family.v2_extras}
    return msgspec.structs.replace(family, **changes)


@lru_cache(maxsize=1)
def builtin_embeddings() -> dict[str, EmbeddingFamily]:
    raw = json.loads((CONFIG_DIR / "builtin_embedding.json").read_text())
    return {d["model_name"]: parse_embedding(d) for d in raw}


@lru_cache(maxsize=1)
def builtin_reranks() -> dict[str, RerankFamily]:
    raw = json.loads((CONFIG_DIR / "builtin_rerank.json").read_text())
    return {d["model_name"]: parse_rerank(d) for d in raw}


@lru_cache(maxsize=1)
def builtin_audios() -> dict[str, AudioFamily]:
    raw = json.loads((CONFIG_DIR / "builtin_audio.json").read_text())
    return {d["model_name"]: msgspec.convert(d, AudioFamily) for d in raw}


def builtins(model_type: str) -> dict:
    return {"LLM": builtin_llms, "embedding": builtin_embeddings, "rerank": builtin_reranks,
            "audio": builtin_audios}[model_type]()


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

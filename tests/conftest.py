from __future__ import annotations

import os
from pathlib import Path

import pytest
from zinfer.shared.tinymodels import CHAT_TEMPLATE

from tests.mesh import Mesh

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama (HF + GGUF) and MiniLM, built once per test session (a few seconds)."""
    from zinfer.shared.tinymodels import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("models"))


def llm_definition(models: dict[str, Path], name: str = "custom-llama-2", **extra) -> dict:
    """A custom-llama-2-style definition (the docs' example) pointing at the tiny models."""
    d = {
        "version": 1,
        "context_length": 2048,
        "model_name": name,
        "model_lang": ["en"],
        "model_ability": ["generate", "chat"],
        "model_family": "other",
        "model_specs": [
            {"model_format": "pytorch", "model_size_in_billions": 1, "quantizations": ["4-bit", "8-bit", "none"],
             "model_id": "zinfer/tiny-llama", "model_uri": f"file://{models['pytorch']}"},
            {"model_format": "ggufv2", "model_size_in_billions": 1, "quantizations": ["F32", "F16"],
             "model_id": "zinfer/tiny-llama-gguf", "model_file_name_template": "tiny-llama.{quantization}.gguf",
             "model_uri": f"file://{models['gguf_dir']}"},
        ],
        "chat_template": CHAT_TEMPLATE,
    }
    d.update(extra)
    return d


def embedding_definition(models: dict[str, Path], name: str = "custom-bge-base-en", **extra) -> dict:
    d = {"model_name": name, "dimensions": 384, "max_tokens": 256, "language": ["en"],
         "model_id": "sentence-transformers/all-MiniLM-L6-v2", "model_uri": f"file://{models['embedding']}"}
    d.update(extra)
    return d


@pytest.fixture
def mesh(tmp_path) -> Mesh:
    """A fresh mesh (broker, registry, scheduler, one CPU worker) for a test that may break things."""
    m = Mesh(tmp_path / "home", tmp_path)
    try:
        m.start_all()
        yield m
    finally:
        m.stop()

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from tests.mesh import Mesh
from zinfer.shared import keys
from zinfer.shared.tinymodels import CHAT_TEMPLATE

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


def rerank_definition(models: dict[str, Path], name: str = "custom-reranker", flat: bool = False, **extra) -> dict:
    """A custom rerank model on the tiny cross-encoder: Xinference's version 2 JSON, or its older flat form."""
    if flat:
        d = {"model_name": name, "type": "normal", "language": ["en"], "model_id": "zinfer/tiny-reranker",
             "model_uri": f"file://{models['rerank']}"}
    else:
        d = {"version": 2, "model_name": name, "type": "normal", "language": ["en"], "max_tokens": 512,
             "model_specs": [{"model_format": "pytorch", "model_id": "zinfer/tiny-reranker",
                              "model_uri": f"file://{models['rerank']}", "quantization": "none"}]}
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


# The launches served meshes are made of: uid -> launch arguments (see served_mesh).
LAUNCHES: dict[str, dict] = {
    "hf": dict(model_name="custom-llama-2", model_format="pytorch"),
    "gg": dict(model_name="custom-llama-2", model_format="ggufv2", quantization="F32"),
    "hf-long": dict(model_name="long-context", model_format="pytorch"),
    "gg-long": dict(model_name="long-context", model_format="ggufv2"),
    "emb": dict(model_name="custom-bge-base-en", model_type="embedding"),
    "rr": dict(model_name="custom-reranker", model_type="rerank"),
}


@contextlib.contextmanager
def served_mesh(tmp_path_factory, tiny_models: dict[str, Path], name: str, launches, *, gateway: bool = False,
                llm: dict | None = None, env: dict[str, str] | None = None):
    """The one builder of a module's served mesh: its own home and broker, the tiny models registered
    (custom-llama-2, long-context with 8192 tokens, custom-bge-base-en, custom-reranker) and `launches`
    launched: uids of LAUNCHES, or (uid, launch arguments) pairs. `llm` adds fields to custom-llama-2's definition;
    `env`: settings (ZINFER_* variables) of every process of the mesh."""
    root = tmp_path_factory.mktemp(name)
    m = Mesh(root / "home", root)
    m.env.update(env or {})
    try:
        m.start_all()
        if gateway:
            m.start_gateway()
            m.admin_api_key = keys.api_key_of(keys.read_key_file(m.admin_key))  # what HTTP clients send
        c = m.client
        c.register_model("LLM", llm_definition(tiny_models, **(llm or {})))
        c.register_model("LLM", llm_definition(tiny_models, "long-context", context_length=8192))
        c.register_model("embedding", embedding_definition(tiny_models))
        c.register_model("rerank", rerank_definition(tiny_models))
        for launch in launches:
            uid, args = (launch, LAUNCHES[launch]) if isinstance(launch, str) else launch
            c.launch_model(model_uid=uid, **args)
        m.root = root
        yield m
    finally:
        m.stop()


# ---------------------------------------------------------------- layers
# Every test is in one layer, picked by what it starts (`pytest -m unit`, `-m mesh`, `-m browser`,
# `-m packaging`; the README's command runs them all): unit tests run in this process only; mesh tests start
# the broker, services and workers as processes (a fixture or the test itself builds a Mesh); browser tests
# drive Chromium; packaging tests build the wheel or lint the tree.
LAYERS = ("unit", "mesh", "browser", "packaging")
PACKAGING_MODULES = {"test_packaging", "test_lint"}
_STARTS_PROCESSES = ("Mesh(", "served_mesh(", "subprocess.", "cli(", "HubServer(", "Hosts(", "_zinfer(", "Popen(",
                     ".start(")


def _starts_processes(func) -> bool:
    import inspect

    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    return any(marker in source for marker in _STARTS_PROCESSES)


def pytest_configure(config):
    for layer in LAYERS:
        config.addinivalue_line("markers", f"{layer}: the {layer} layer of the suite (tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(mark.name in LAYERS for mark in item.iter_markers()):
            continue  # its module names its layer (test_scheduler_loop: core.start() is a thread, no process)
        module = item.module.__name__.rsplit(".", 1)[-1]
        defs = [d for ds in item._fixtureinfo.name2fixturedefs.values() for d in ds]
        if module in PACKAGING_MODULES:
            layer = "packaging"
        elif "browser" in item.fixturenames:
            layer = "browser"
        elif _starts_processes(item.function) or any(_starts_processes(d.func) for d in defs):
            layer = "mesh"
        else:
            layer = "unit"
        item.add_marker(getattr(pytest.mark, layer))

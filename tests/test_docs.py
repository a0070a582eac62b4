"""Run the Python examples of docs/*.md against a real mesh, so the docs cannot rot."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from tests.mesh import REPO

BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def python_blocks(doc: str) -> list[str]:
    return BLOCK.findall((REPO / "docs" / doc).read_text())


def test_usage_examples_run(mesh, tiny_models, tmp_path, monkeypatch):
    for name, target in (("custom-llama-2", "model.json"), ("custom-bge", "embedding.json")):
        text = (REPO / "examples" / f"{name}.json").read_text().replace("{MODELS}", str(tiny_models["pytorch"].parent))
        (tmp_path / target).write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZINFER_HOME", str(mesh.home))  # as for a user of the machine that ran `zinfer up`
    namespace: dict = {}
    blocks = python_blocks("usage.md")
    assert len(blocks) >= 5
    out = io.StringIO()
    for i, block in enumerate(blocks):
        code = block.replace("tcp://127.0.0.1:9997", mesh.endpoint)
        with contextlib.redirect_stdout(out):
            try:
                exec(compile(code, f"docs/usage.md[block {i}]", "exec"), namespace)
            except Exception as exc:  # show which block broke
                pytest.fail(f"docs/usage.md block {i} failed: {type(exc).__name__}: {exc}\n{code}")
    printed = out.getvalue()
    assert "ready" in printed and "length 16" in printed and "(3, 384)" in printed
    namespace["client"].close()


def test_models_doc_examples_are_valid_json():
    import json

    doc = (REPO / "docs" / "models.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", doc, re.S)
    assert len(blocks) >= 3
    for block in blocks:
        json.loads(block)

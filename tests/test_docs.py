"""Run the examples of docs/*.md (Python, and bash with curl) against a real mesh, so the docs cannot rot."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mesh import REPO
from zinfer.shared import keys


def code_blocks(doc: str) -> list[tuple[str, str]]:
    """(language, code) of every python and bash block, in order."""
    return re.findall(r"```(python|bash)\n(.*?)```", (REPO / "docs" / doc).read_text(), re.S)


def test_usage_examples_run(mesh, tiny_models, tmp_path, monkeypatch):
    """Every python and bash block of docs/usage.md, in order, against a mesh with its HTTP gateway: the Python
    client, the OpenAI SDK and curl examples cannot rot."""
    for name, target in (("custom-llama-2", "model.json"), ("custom-bge", "embedding.json"),
                         ("custom-reranker", "reranker.json"), ("tool-llama", "tools.json"),
                         ("custom-whisper", "whisper.json"), ("custom-llava", "llava.json")):
        text = (REPO / "examples" / f"{name}.json").read_text().replace("{MODELS}", str(tiny_models["pytorch"].parent))
        (tmp_path / target).write_text(text)
    mesh.start_gateway()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZINFER_HOME", str(mesh.home))  # as for a user of the machine that ran `zinfer up`
    monkeypatch.setenv("ZINFER_API_KEY", keys.api_key_of(keys.read_key_file(mesh.admin_key)))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # `zinfer` itself

    def local(code: str) -> str:
        return code.replace("tcp://127.0.0.1:9997", mesh.endpoint).replace("http://127.0.0.1:9998",
                                                                            mesh.gateway_url)

    namespace: dict = {}
    blocks = code_blocks("usage.md")
    assert sum(lang == "python" for lang, _ in blocks) >= 6 and sum("curl" in code for _, code in blocks) >= 1
    out = io.StringIO()
    for i, (lang, block) in enumerate(blocks):
        code = local(block)
        if lang == "bash":
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True,
                                  env=dict(os.environ, ZINFER_ENDPOINT=mesh.endpoint), timeout=120)
            assert done.returncode == 0, f"docs/usage.md block {i} failed: {done.stderr}\n{code}"
            out.write(done.stdout)
            continue
        with contextlib.redirect_stdout(out):
            try:
                exec(compile(code, f"docs/usage.md[block {i}]", "exec"), namespace)
            except Exception as exc:  # show which block broke
                pytest.fail(f"docs/usage.md block {i} failed: {type(exc).__name__}: {exc}\n{code}")
    printed = out.getvalue()
    assert "ready" in printed and "length 16" in printed and "(3, 384)" in printed and "usage:" in printed
    assert '"object":"text_completion"' in printed and "data: [DONE]" in printed  # curl: JSON, then SSE
    assert "'relevance_score'" in printed and '"relevance_score"' in printed  # rerank: Python, then curl
    assert "tool_calls get_weather {'city': 'Paris'}" in printed and "It is sunny and 22 C in Paris." in printed
    assert "Two plus two makes four. -> The answer is 4." in printed
    assert re.search(r"with the image: \d+ prompt tokens", printed)
    namespace["client"].close()


def test_models_doc_examples_are_valid_json():
    import json

    doc = (REPO / "docs" / "models.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", doc, re.S)
    assert len(blocks) >= 3
    for block in blocks:
        json.loads(block)


def test_readme_http_examples_are_the_ones_usage_runs():
    readme, usage = (REPO / "README.md").read_text(), (REPO / "docs" / "usage.md").read_text()
    http = [code for _, code in re.findall(r"```(python|bash)\n(.*?)```", readme, re.S)
            if "9998" in code or "ZINFER_API_KEY" in code]
    assert len(http) >= 3
    for code in http:
        assert code in usage, code

"""Xinference's current "Custom Models" page (doc/source/models/custom.rst, version 2 templates) as written: the LLM,
embedding and rerank templates register with the CLI (--persist) and with xinference-client, launch and serve one
request each, and come back from `zinfer registration NAME` in their own form; with only model_uri pointed at real
folders. Its bad variants (virtualenv packages, is_builtin true, another hub, an unknown field) are refused naming
the field, and nothing is registered."""

from __future__ import annotations

import copy
import json

import pytest
from xinference_client import RESTfulClient

from tests.conftest import served_mesh
from tests.test_dropin import cli
from zinfer.shared import keys

VENV = {"packages": [], "inherit_pip_config": True, "index_url": None, "extra_index_url": None, "find_links": None,
        "trusted_host": None, "no_build_isolation": None}
# As the page writes them (its placeholders for model_uri filled in below).
LLM = {"version": 2, "context_length": 32768, "model_name": "custom-qwen-2.5", "model_lang": ["en", "zh"],
       "model_ability": ["generate"], "model_description": "This is a custom model description.",
       "model_family": "my-custom-qwen-2.5",
       "model_specs": [{"model_format": "pytorch", "model_size_in_billions": "0_5", "quantization": "none",
                        "model_id": None, "model_hub": "huggingface", "model_uri": "file:///path/to/models",
                        "model_revision": None, "activated_size_in_billions": None}],
       "chat_template": None, "stop_token_ids": None, "stop": None, "reasoning_start_tag": None,
       "reasoning_end_tag": None, "cache_config": None, "virtualenv": VENV, "is_builtin": False}
EMBEDDING = {"version": 2, "model_name": "my-bge-large-zh-v1.5", "dimensions": 1024, "max_tokens": 512,
             "language": ["zh"], "model_specs": [{"model_format": "pytorch", "model_hub": "huggingface",
                                                  "model_id": None, "model_uri": "file:///path/to/my-bge",
                                                  "model_revision": None, "quantization": "none"}],
             "cache_config": None, "virtualenv": VENV, "is_builtin": False}
RERANK = {"version": 2, "model_name": "my-bge-reranker-base",
          "model_specs": [{"model_format": "pytorch", "model_hub": "huggingface", "model_id": None,
                           "model_revision": None, "model_uri": "file:///path/to/my-bge-reranker-base",
                           "quantization": "none"}],
          "language": ["en", "zh"], "type": "unknown", "max_tokens": 512, "virtualenv": VENV, "is_builtin": False}


def as_written(template: dict, folder, **changes) -> dict:
    out = copy.deepcopy(template)
    out["model_specs"][0]["model_uri"] = f"file://{folder}"
    out.update(changes)
    return out


@pytest.fixture(scope="module")
def xm(tmp_path_factory, tiny_models):
    with served_mesh(tmp_path_factory, tiny_models, "current", [], gateway=True) as m:
        m.admin_api_key = keys.api_key_of(keys.read_key_file(m.admin_key))
        m.templates = {"LLM": as_written(LLM, tiny_models["pytorch"]),
                       "embedding": as_written(EMBEDDING, tiny_models["embedding"], dimensions=384),
                       "rerank": as_written(RERANK, tiny_models["rerank"])}
        yield m


def _serve_one(m, kind: str, uid: str) -> None:
    model = m.client.get_model(uid)
    if kind == "LLM":
        assert model.generate("Hello", {"max_tokens": 3})["usage"]["completion_tokens"] == 3
    elif kind == "embedding":
        assert len(model.create_embedding("hi")["data"][0]["embedding"]) == 384
    else:
        assert len(model.rerank(["a whale", "a fox"], "whales")["results"]) == 2


@pytest.mark.parametrize("kind", ["LLM", "embedding", "rerank"])
def test_the_current_templates_register_with_the_cli_launch_serve_and_round_trip(xm, kind, tmp_path):
    template = xm.templates[kind]
    name = template["model_name"]
    path = tmp_path / "model.json"
    path.write_text(json.dumps(template))
    out = cli(xm, "register", "--model-type", kind, "--file", str(path), "--persist")
    assert out.returncode == 0, out.stderr
    try:
        back = json.loads(cli(xm, "registration", name).stdout)
        want = {k: v for k, v in template.items() if v is not None}
        want["model_specs"] = [{k: v for k, v in s.items() if v is not None} for s in template["model_specs"]]
        assert {k: back.get(k) for k in want} == want  # its own form: version 2, model_specs, virtualenv, ...
        uid = xm.client.launch_model(model_name=name, model_type=kind, model_uid=f"cur-{kind.lower()}")
        _serve_one(xm, kind, uid)
        xm.client.terminate_model(uid)
    finally:
        xm.client.unregister_model(kind, name)


@pytest.mark.parametrize("kind", ["LLM", "embedding", "rerank"])
def test_the_current_templates_register_with_xinference_client(xm, kind):
    client = RESTfulClient(xm.gateway_url, api_key=xm.admin_api_key)
    template = xm.templates[kind]
    client.register_model(model_type=kind, model=json.dumps(template), persist=False)
    try:
        assert template["model_name"] in {r["model_name"] for r in client.list_model_registrations(kind)}
        uid = client.launch_model(model_name=template["model_name"], model_type=kind, model_uid=f"xc-{kind.lower()}")
        _serve_one(xm, kind, uid)
        client.terminate_model(uid)
    finally:
        client.unregister_model(model_type=kind, model_name=template["model_name"])


BAD = [("virtualenv", {"virtualenv": {**VENV, "packages": ["transformers==4.51"]}}, "virtualenv.packages"),
       ("is_builtin", {"is_builtin": True}, "is_builtin"),
       ("hub", None, "model_specs[0].model_hub"),
       ("unknown field", {"model_engine_hint": "vllm"}, "model_engine_hint")]


@pytest.mark.parametrize("kind", ["LLM", "embedding", "rerank"])
@pytest.mark.parametrize("label,change,field", BAD, ids=[b[0] for b in BAD])
def test_bad_variants_are_refused_naming_the_field(xm, kind, label, change, field, tmp_path):
    template = copy.deepcopy(xm.templates[kind])
    if change is None:
        template["model_specs"][0]["model_hub"] = "modelscope"
    else:
        template.update(change)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(template))
    out = cli(xm, "register", "--model-type", kind, "--file", str(path))
    assert out.returncode != 0 and field in out.stderr, out.stderr
    assert template["model_name"] not in {r["model_name"] for r in xm.client.list_model_registrations(kind)}

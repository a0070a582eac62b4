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
        m.templates = {"LLM": as_written(LLM, tiny_models["pytorch"]),
                       "embedding": as_written(EMBEDDING, tiny_models["embedding"], dimensions=384),
                       "rerank": as_written(RERANK, tiny_models["rerank"])}
        yield m


def _serve_one(m, kind: str, uid: str) -> None:
    model = m.client.get_model(uid)
    if kind == "LLM":
        # ignore_eos does not lift a registration's stop_token_ids, and a definition filled from a folder takes
        # generation_config.json's eos ids as its stops: a freshly trained tiny model may say one within 3 tokens.
        out = model.generate("Hello", {"max_tokens": 3, "ignore_eos": True})
        assert out["usage"]["completion_tokens"] == 3 or out["choices"][0]["finish_reason"] == "stop"
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


FROM_PATH = [("tiny-llama", "pytorch", "LLM"), ("gguf/tiny-llama.F32.gguf", "gguf", "LLM"),
             ("tool-llama", "tools_pytorch", "LLM"), ("minilm", "embedding", "embedding"),
             ("tiny-reranker", "rerank", "rerank"),
             ("embed-gguf/tiny-embedder.F32.gguf", "embedding_gguf", "embedding")]


@pytest.mark.parametrize("rel,key,kind", FROM_PATH, ids=[f[0] for f in FROM_PATH])
def test_register_from_path_fills_a_definition_that_registers_and_launches_unchanged(xm, tiny_models, rel, key,
                                                                                      kind):
    from transformers import AutoConfig

    path = tiny_models[key]
    name = f"fp-{key.replace('_', '-')}"
    out = cli(xm, "register", "--from-path", str(path), "--name", name)
    assert out.returncode == 0, out.stderr
    definition = json.loads(out.stdout)
    assert definition["model_name"] == name and definition["version"] == 2
    try:
        assert holds(xm.client.get_model_registration(kind, name), definition)  # registered as printed
        spec = definition["model_specs"][0]
        if kind == "LLM" and key != "gguf":
            config = AutoConfig.from_pretrained(str(path))
            assert definition["context_length"] == config.max_position_embeddings
            import safetensors

            with safetensors.safe_open(str(path / "model.safetensors"), "np") as f:
                params = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                             else int(__import__("numpy").prod(f.get_slice(k).get_shape())) for k in f.keys())
            assert abs(float(spec["model_size_in_billions"].replace("_", ".")) - params / 1e9) / (params / 1e9) < 0.05
            assert "chat" in definition["model_ability"]
            if key == "tools_pytorch":
                assert {"tools", "reasoning"} <= set(definition["model_ability"])
                assert definition["reasoning_start_tag"] == "<think>"
                assert definition["stop_token_ids"] == json.loads((path / "generation_config.json").read_text())[
                    "eos_token_id"]
        if key == "gguf":
            assert spec["model_format"] == "ggufv2" and spec["quantization"] == "F32"
            assert spec["model_file_name_template"] == "tiny-llama.{quantization}.gguf"
        dims = 64 if key == "embedding_gguf" else 384  # the tiny BERT's GGUF (llama.cpp), or MiniLM
        if key == "embedding_gguf":
            assert spec["model_format"] == "ggufv2" and definition["max_tokens"] == 512
            assert spec["model_file_name_template"] == "tiny-embedder.{quantization}.gguf"
        elif kind == "embedding":
            assert definition["max_tokens"] == 256
        if kind == "embedding":
            assert definition["dimensions"] == dims
        launch = {"model_format": spec["model_format"]} if kind == "LLM" else {}
        uid = xm.client.launch_model(model_name=name, model_type=kind, model_uid=f"u-{name}", **launch)
        _serve_one(xm, kind, uid) if kind != "embedding" else None
        if kind == "embedding":
            assert len(xm.client.get_model(uid).create_embedding("hi")["data"][0]["embedding"]) == dims
        xm.client.terminate_model(uid)
    finally:
        xm.client.unregister_model(kind, name)


def holds(got, want) -> bool:
    """`got` has every field of `want` with its value (defaults it adds are fine)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(holds(got.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(holds, got, want))
    return got == want


def test_register_from_a_path_with_no_model_says_so(xm, tmp_path):
    out = cli(xm, "register", "--from-path", str(tmp_path))
    assert out.returncode != 0 and "model_path" in out.stderr and "holds no model" in out.stderr
    out = cli(xm, "register", "--from-path", str(tmp_path / "nothing-here"))
    assert out.returncode != 0 and "does not exist" in out.stderr


def test_launch_a_folder_or_gguf_file_as_a_named_model_without_registering(xm, tiny_models):
    out = cli(xm, "launch", "--model-path", str(tiny_models["pytorch"]), "-n", "llama-2-chat", "--model-engine",
              "transformers", "--model-uid", "by-path")
    assert out.returncode == 0, out.stderr
    try:
        view = xm.client.describe_model("by-path")
        assert view["model_path"] == str(tiny_models["pytorch"]) and view["model_name"] == "llama-2-chat"
        assert view["context_length"] == 2048  # config.json's, not llama-2-chat's 4096
        listed = cli(xm, "list")
        assert f"llama-2-chat (from {tiny_models['pytorch']})" in listed.stdout.replace("\n", ""), listed.stdout
        model = xm.client.get_model("by-path")
        rendered = model.render_chat([{"role": "user", "content": "Hi"}])
        assert rendered["template_source"] == "prompt_style" and "[INST]" in rendered["prompt"]  # llama-2-chat's
        # ignore_eos: a sampled answer of the random model may end at once (it did, one run in several)
        assert model.chat([{"role": "user", "content": "Hi"}], {"max_tokens": 3, "ignore_eos": True}
                          )["usage"]["completion_tokens"] == 3
    finally:
        xm.client.terminate_model("by-path")
    client = RESTfulClient(xm.gateway_url, api_key=xm.admin_api_key)  # model_path in the REST launch
    gguf = tiny_models["gguf"]
    uid = client.launch_model(model_name="llama-2-chat", model_path=str(gguf), model_uid="by-gguf")
    try:
        view = xm.client.describe_model(uid)
        assert view["model_format"] == "ggufv2" and view["model_path"] == str(gguf)
        assert view["context_length"] == 2048  # the GGUF metadata's
        assert xm.client.get_model(uid).generate("Hi", {"max_tokens": 2, "ignore_eos": True}
                                                 )["usage"]["completion_tokens"] == 2
    finally:
        xm.client.terminate_model(uid)


def test_launch_by_path_refuses_a_missing_path_and_an_unknown_name(xm, tmp_path, tiny_models):
    from zinfer.shared.errors import InvalidRequest, NotFound

    with pytest.raises(InvalidRequest) as err:
        xm.client.launch_model(model_name="llama-2-chat", model_path=str(tmp_path / "nothing"), model_uid="x1")
    assert err.value.field == "model_path"
    with pytest.raises(NotFound) as err:
        xm.client.launch_model(model_name="no-such-model", model_path=str(tiny_models["pytorch"]), model_uid="x2")
    assert err.value.field == "model_name"
    assert "x1" not in xm.client.list_models() and "x2" not in xm.client.list_models()


def test_a_registration_naming_a_built_in_family_chats_in_its_format(xm, tiny_models):
    """Today's families are listed, and a model registered under one (giving no template, stops or tags of its own)
    chats with the family's template and splits its reasoning at the family's tags."""
    listed = {r["model_name"] for r in xm.client.list_model_registrations("LLM")}
    assert {"qwen2.5-instruct", "qwen3", "llama-3.1-instruct", "llama-3.3-instruct", "mistral-instruct-v0.3",
            "gemma-3-it", "deepseek-r1-distill-qwen", "deepseek-r1-distill-llama", "phi-4"} <= listed
    definition = {"version": 2, "model_name": "my-r1", "model_family": "deepseek-r1-distill-qwen",
                  "model_lang": ["en"], "model_ability": ["chat", "reasoning"], "context_length": 2048,
                  "model_specs": [{"model_format": "pytorch", "model_size_in_billions": 1, "quantization": "none",
                                   "model_uri": f"file://{tiny_models['pytorch']}"}]}
    xm.client.register_model("LLM", definition)
    try:
        xm.client.launch_model(model_name="my-r1", model_uid="my-r1")
        model = xm.client.get_model("my-r1")
        rendered = model.render_chat([{"role": "user", "content": "Hi"}])
        assert rendered["template_source"] == "registration" and rendered["prompt"].endswith("<｜Assistant｜><think>\n")
        out = model.chat([{"role": "user", "content": "Hi"}], {"max_tokens": 6, "temperature": 0})
        message = out["choices"][0]["message"]
        # the answer opened inside <think>: the tiny model's words (no </think>) are all reasoning
        assert message["reasoning_content"] and not message["content"]
    finally:
        xm.client.terminate_model("my-r1")
        xm.client.unregister_model("LLM", "my-r1")

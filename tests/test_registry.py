"""Registering custom models through the real mesh: the docs' examples, persistence, validation."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import embedding_definition, llm_definition
from tests.mesh import REPO, Mesh
from zinfer.shared.errors import InvalidRequest, NotFound


def start_registry_mesh(m: Mesh) -> Mesh:
    m.start_broker()
    m.start("registry", "registry")
    m.start("scheduler", "scheduler")
    m.wait_services({"registry", "scheduler"})
    return m


@pytest.fixture(scope="module")
def reg_mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("regmesh")
    m = start_registry_mesh(Mesh(root / "home", root))
    yield m
    m.stop()


@pytest.fixture
def fresh(tmp_path):
    m = start_registry_mesh(Mesh(tmp_path / "home", tmp_path))
    yield m
    m.stop()


def doc_llm(models, tmp_path) -> dict:
    """The custom-llama-2 example of Xinference's docs (pytorch + ggmlv3 specs), pointed at local paths."""
    ggml = tmp_path / "llama-2-7b.ggmlv3.q4_0.bin"
    ggml.write_bytes(b"ggml placeholder")
    return {
        "version": 1,
        "context_length": 2048,
        "model_name": "custom-llama-2",
        "model_lang": ["en"],
        "model_ability": ["generate"],
        "model_family": "llama-2",
        "model_specs": [
            {"model_format": "pytorch", "model_size_in_billions": 7, "quantizations": ["4-bit", "8-bit", "none"],
             "model_id": "meta-llama/Llama-2-7b-hf", "model_uri": f"file://{models['pytorch']}"},
            {"model_format": "ggmlv3", "model_size_in_billions": 7, "quantizations": ["q4_0", "q8_0"],
             "model_id": "TheBloke/Llama-2-7B-GGML", "model_file_name_template": "llama-2-7b.ggmlv3.{quantization}.bin",
             "model_uri": f"file://{ggml}"},
        ],
    }


def doc_embedding(models) -> dict:
    return {"model_name": "custom-bge-base-en", "dimensions": 384, "max_tokens": 512, "language": ["en"],
            "model_id": "BAAI/bge-base-en", "model_uri": f"file://{models['embedding']}"}


def names(client, model_type):
    return {r["model_name"]: r["is_builtin"] for r in client.list_model_registrations(model_type=model_type)}


def test_docs_examples_with_the_client(reg_mesh, tiny_models, tmp_path):
    client = reg_mesh.client
    llm = doc_llm(tiny_models, tmp_path)
    client.register_model(model_type="LLM", model=json.dumps(llm), persist=False)
    client.register_model(model_type="embedding", model=json.dumps(doc_embedding(tiny_models)), persist=False)
    assert names(client, "LLM")["custom-llama-2"] is False
    assert names(client, "LLM")["llama-2"] is True
    assert names(client, "embedding")["custom-bge-base-en"] is False
    assert client.get_model_registration("LLM", "custom-llama-2") == {**llm, "model_specs": llm["model_specs"]}
    client.unregister_model(model_type="LLM", model_name="custom-llama-2")
    client.unregister_model(model_type="embedding", model_name="custom-bge-base-en")
    assert "custom-llama-2" not in names(client, "LLM")
    with pytest.raises(NotFound):
        client.get_model_registration("LLM", "custom-llama-2")


def zinfer(mesh, *args, input=None):
    return subprocess.run([sys.executable, "-m", "zinfer", *args], capture_output=True, text=True, cwd=REPO,
                          env=mesh.env, input=input, timeout=60)


def test_docs_examples_with_the_cli(fresh, tiny_models, tmp_path):
    llm_file = tmp_path / "model.json"
    llm_file.write_text(json.dumps(doc_llm(tiny_models, tmp_path)))
    emb_file = tmp_path / "embedding.json"
    emb_file.write_text(json.dumps(doc_embedding(tiny_models)))
    out = zinfer(fresh, "register", "--model-type", "LLM", "--file", str(llm_file), "--persist")
    assert out.returncode == 0, out.stderr
    assert zinfer(fresh, "register", "--model-type", "embedding", "--file", str(emb_file)).returncode == 0
    table = zinfer(fresh, "registrations", "--model-type", "LLM")
    assert table.returncode == 0 and "custom-llama-2" in table.stdout and "llama-2-chat" in table.stdout
    listed = json.loads(zinfer(fresh, "registrations", "--model-type", "embedding", "--json").stdout)
    assert {"model_name": "custom-bge-base-en", "is_builtin": False} .items() <= \
        next(i for i in listed if i["model_name"] == "custom-bge-base-en").items()
    assert (fresh.home / "models" / "LLM" / "custom-llama-2.json").exists()
    assert zinfer(fresh, "unregister", "--model-type", "LLM", "--model-name", "custom-llama-2").returncode == 0
    assert not (fresh.home / "models" / "LLM" / "custom-llama-2.json").exists()
    assert zinfer(fresh, "unregister", "--model-type", "embedding", "--model-name",
                  "custom-bge-base-en").returncode == 0
    # Errors: one readable line per problem, exit 1.
    out = zinfer(fresh, "unregister", "--model-type", "LLM", "--model-name", "llama-2")
    assert out.returncode == 1 and "built-in" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**doc_llm(tiny_models, tmp_path), "model_name": "-x", "model_lang": "en"}))
    out = zinfer(fresh, "register", "--model-type", "LLM", "--file", str(bad))
    assert out.returncode == 1 and "model_lang" in out.stderr and "Traceback" not in out.stderr
    out = zinfer(fresh, "register", "--model-type", "LLM", "--file", str(tmp_path / "missing.json"))
    assert out.returncode == 1 and "missing.json" in out.stderr


def test_persistence_survives_a_restart_of_the_whole_mesh(tmp_path, tiny_models):
    home = tmp_path / "home"
    m = start_registry_mesh(Mesh(home, tmp_path))
    try:
        m.client.register_model("LLM", llm_definition(tiny_models, "kept"), persist=True)
        m.client.register_model("LLM", llm_definition(tiny_models, "forgotten"), persist=False)
        m.client.register_model("embedding", embedding_definition(tiny_models, "kept-emb"), persist=True)
        v2 = llm_definition(tiny_models, "kept-v2")
        v2["version"] = 2
        v2["model_specs"] = [{k: v for k, v in s.items() if k != "quantizations"} | {"quantization": q}
                             for s in v2["model_specs"] for q in s["quantizations"][:1]]
        m.client.register_model("LLM", v2, persist=True)
    finally:
        m.stop()
    m = start_registry_mesh(Mesh(home, tmp_path))
    try:
        llms = names(m.client, "LLM")
        assert "kept" in llms and "kept-v2" in llms and "forgotten" not in llms
        assert "kept-emb" in names(m.client, "embedding")
        again = m.client.get_model_registration("LLM", "kept-v2")
        assert again["version"] == 2 and again["model_specs"][0]["quantization"] == "4-bit"
        assert "quantizations" not in again["model_specs"][0]
    finally:
        m.stop()


def test_a_killed_write_never_leaves_a_definition_that_loads_half(tmp_path, tiny_models):
    home = tmp_path / "home"
    m = start_registry_mesh(Mesh(home, tmp_path))
    client = m.new_client(timeout=5)
    done = []

    def flood():
        for i in range(400):
            try:
                client.register_model("LLM", llm_definition(tiny_models, f"m{i}"), persist=True)
                done.append(i)
            except Exception:
                return

    t = threading.Thread(target=flood)
    t.start()
    m.wait(lambda: len(done) >= 20 or None)
    m.kill("registry")  # SIGKILL while it is writing definitions
    t.join()
    # What a crash can leave: a temp file mid-write, and (from another writer) a truncated definition.
    folder = home / "models" / "LLM"
    (folder / ".tmp-crashed.json").write_text('{"version": 1, "model_na')
    (folder / "truncated.json").write_text(json.dumps(llm_definition(tiny_models, "truncated"))[:100])
    m.start("registry", "registry")
    m.wait_services({"registry"})
    try:
        listed = names(m.client, "LLM")
        files = sorted(f.stem for f in folder.glob("*.json"))
        assert "truncated" not in listed
        assert set(files) - {"truncated"} <= set(listed)  # every complete file loaded...
        for i in done:
            assert f"m{i}" in listed  # ...and every acknowledged registration survived
        assert not list(folder.glob(".tmp-*"))
        status = m.client.registry_status()
        assert [c["path"] for c in status["corrupt"]] == [str(folder / "truncated.json")]
        out = zinfer(m, "status")
        assert "truncated.json" in out.stdout
    finally:
        m.stop()


# ---------------------------------------------------------------- invalid definitions


def _spec(**kw):
    base = {"model_format": "pytorch", "model_size_in_billions": 1, "quantizations": ["none"], "model_id": "a/b"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def _llm(**kw):
    base = {"version": 1, "model_name": "ok-model", "model_lang": ["en"], "model_ability": ["generate"],
            "model_family": "other", "model_specs": [_spec()]}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def _gguf(**kw):
    return _spec(**{"model_format": "ggufv2", "quantizations": ["q4_0"],
                    "model_file_name_template": "m.{quantization}.gguf", **kw})


INVALID_LLM = [
    ("name starts with dash", _llm(model_name="-x"), "model_name"),
    ("name with space", _llm(model_name="a b"), "model_name"),
    ("name with path", _llm(model_name="../x"), "model_name"),
    ("name too long", _llm(model_name="a" * 257), "model_name"),
    ("empty name", _llm(model_name=""), "model_name"),
    ("name of a built-in", _llm(model_name="llama-2"), "model_name"),
    ("name not a string", _llm(model_name=5), "model_name"),
    ("unknown top-level field", {**_llm(), "model_famly": "other"}, "model_famly"),
    ("unknown spec field", _llm(model_specs=[{**_spec(), "quantisations": ["none"]}]), "model_specs[0].quantisations"),
    ("empty specs", _llm(model_specs=[]), "model_specs"),
    ("specs not a list", _llm(model_specs={}), "model_specs"),
    ("empty abilities", _llm(model_ability=[]), "model_ability"),
    ("unknown ability", _llm(model_ability=["fly"]), "model_ability"),
    ("only abilities zinfer cannot serve", _llm(model_ability=["vision"]), "model_ability"),
    ("model_lang not a list", _llm(model_lang="en"), "model_lang"),
    ("context_length zero", _llm(context_length=0), "context_length"),
    ("context_length string", _llm(context_length="2k"), "context_length"),
    ("bad version", _llm(version=3), "version"),
    ("unknown format", _llm(model_specs=[_spec(model_format="onnx")]), "model_specs[0].model_format"),
    ("size negative", _llm(model_specs=[_spec(model_size_in_billions=-7)]), "model_specs[0].model_size_in_billions"),
    ("size bad string", _llm(model_specs=[_spec(model_size_in_billions="1.8")]),
     "model_specs[0].model_size_in_billions"),
    ("size a float", _llm(model_specs=[_spec(model_size_in_billions=1.5)]), "model_specs[0].model_size_in_billions"),
    ("empty quantizations", _llm(model_specs=[_spec(quantizations=[])]), "model_specs[0].quantizations"),
    ("pytorch quantization", _llm(model_specs=[_spec(quantizations=["q4_0"])]), "model_specs[0].quantizations"),
    ("gguf without template", _llm(model_specs=[_spec(model_format="ggufv2", quantizations=["q4_0"])]),
     "model_specs[0].model_file_name_template"),
    ("template without {quantization}", _llm(model_specs=[_gguf(model_file_name_template="m.gguf")]),
     "model_specs[0].model_file_name_template"),
    ("second spec wrong", _llm(model_specs=[_spec(), _spec(model_format="ggmlv3", quantizations=["q4_0"])]),
     "model_specs[1].model_file_name_template"),
    ("no model_id nor model_uri", _llm(model_specs=[_spec(model_id=None)]), "model_specs[0].model_id"),
    ("relative uri", _llm(model_specs=[_spec(model_uri="models/x")]), "model_specs[0].model_uri"),
    ("http uri", _llm(model_specs=[_spec(model_uri="https://example.com/x")]), "model_specs[0].model_uri"),
    ("missing uri", _llm(model_specs=[_spec(model_uri="file:///nonexistent/zinfer/model")]),
     "model_specs[0].model_uri"),
    ("virtualenv with packages", _llm(version=2, model_specs=[_spec(quantizations=None, quantization="none")],
                                      virtualenv={"packages": ["flash-attn"]}), "virtualenv.packages"),
    ("is_builtin true", _llm(version=2, model_specs=[_spec(quantizations=None, quantization="none")],
                             is_builtin=True), "is_builtin"),
    ("unknown hub", _llm(version=2, model_specs=[_spec(quantizations=None, quantization="none",
                                                       model_hub="modelscope")]), "model_specs[0].model_hub"),
    ("unknown prompt style", _llm(prompt_style="FANCY"), "prompt_style"),
    ("prompt style object missing name", _llm(prompt_style={"roles": ["u", "a"]}), "prompt_style.style_name"),
    # a folder here without a template (/usr has none); a Hub id alone is checked at launch
    ("chat without style or template", _llm(model_ability=["chat"], model_specs=[_spec(model_id=None,
                                                                                     model_uri="/usr")]),
     "chat_template"),
    ("stop_token_ids not ints", _llm(stop_token_ids=["x"]), "stop_token_ids[0]"),
    ("v2 spec with quantizations", _llm(version=2, model_specs=[_spec()]), "model_specs[0]"),
    ("not an object", [1, 2], ""),
]


def test_invalid_llm_table_is_long_enough():
    assert len(INVALID_LLM) >= 30


@pytest.mark.parametrize("label,definition,field", INVALID_LLM, ids=[c[0] for c in INVALID_LLM])
def test_invalid_llm_definitions(reg_mesh, label, definition, field):
    with pytest.raises(InvalidRequest) as err:
        reg_mesh.client.register_model("LLM", json.dumps(definition), persist=True)
    text = str(err.value)
    assert field in text, text
    assert not list((reg_mesh.home / "models").rglob("*.json"))  # nothing persisted


@pytest.mark.parametrize("label,text,field", [
    ("not JSON", "{model_name: x", "not valid JSON"),
    ("huge JSON", json.dumps({"model_name": "x", "pad": "a" * (2 << 20)}), "bytes"),
    ("empty", "", "not valid JSON"),
])
def test_unparseable_definitions(reg_mesh, label, text, field):
    with pytest.raises(InvalidRequest, match=field):
        reg_mesh.client.register_model("LLM", text, persist=True)


@pytest.mark.parametrize("definition,field", [
    ({"model_name": "e", "dimensions": 0, "max_tokens": 1, "language": ["en"], "model_id": "a"}, "dimensions"),
    ({"model_name": "e", "dimensions": 8, "max_tokens": "big", "language": ["en"], "model_id": "a"}, "max_tokens"),
    ({"model_name": "e", "dimensions": 8, "max_tokens": 1, "language": ["en"]}, "model_id"),
    ({"model_name": "e", "dimensions": 8, "max_tokens": 1, "language": ["en"], "model_id": "a", "x": 1}, "x"),
    ({"model_name": "bge-base-en", "dimensions": 8, "max_tokens": 1, "language": ["en"], "model_id": "a"},
     "model_name"),
    ({"model_name": "e", "dimensions": 8, "max_tokens": 1, "language": ["en"], "model_uri": "/nonexistent/x"},
     "model_uri"),
])
def test_invalid_embedding_definitions(reg_mesh, definition, field):
    with pytest.raises(InvalidRequest, match=field):
        reg_mesh.client.register_model("embedding", definition, persist=True)


def test_bad_model_type_and_duplicates(reg_mesh, tiny_models):
    with pytest.raises(InvalidRequest, match="this is an LLM definition .* --model-type LLM"):
        reg_mesh.client.register_model("rerank", llm_definition(tiny_models))
    with pytest.raises(InvalidRequest, match="model_type"):
        reg_mesh.client.register_model("image", llm_definition(tiny_models))
    with pytest.raises(InvalidRequest, match="model_type"):
        reg_mesh.client.list_model_registrations("image")
    reg_mesh.client.register_model("LLM", llm_definition(tiny_models, "dup"))
    try:
        with pytest.raises(InvalidRequest, match="already registered"):
            reg_mesh.client.register_model("LLM", llm_definition(tiny_models, "dup"))
    finally:
        reg_mesh.client.unregister_model("LLM", "dup")
    with pytest.raises(NotFound):
        reg_mesh.client.unregister_model("LLM", "never-registered")


def test_builtins_list_without_weights(reg_mesh):
    llms = reg_mesh.client.list_model_registrations("LLM")
    builtin = {r["model_name"] for r in llms if r["is_builtin"]}
    assert {"llama-2", "llama-2-chat", "qwen-chat"} <= builtin
    assert reg_mesh.client.get_model_registration("LLM", "llama-2-chat")["prompt_style"] == "LLAMA2"
    with pytest.raises(InvalidRequest, match="built-in"):
        reg_mesh.client.unregister_model("LLM", "llama-2")


def test_chat_model_inherits_its_family_prompt_style(reg_mesh, tiny_models):
    d = llm_definition(tiny_models, "inherits", model_ability=["chat"], model_family="llama-2-chat")
    d.pop("chat_template")
    reg_mesh.client.register_model("LLM", d)
    reg_mesh.client.unregister_model("LLM", "inherits")


# ---------------------------------------------------------------- property tests

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values, model_type=st.sampled_from(["LLM", "embedding"]))
def test_random_json_only_ever_gets_a_validation_error(reg_mesh, value, model_type):
    with pytest.raises(InvalidRequest):
        reg_mesh.client.register_model(model_type, json.dumps(value))


FIELDS = ["version", "context_length", "model_name", "model_lang", "model_ability", "model_family",
          "model_specs", "prompt_style", "chat_template", "stop", "stop_token_ids", "extra"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=json_values, drop=st.booleans())
def test_mutated_definitions_register_cleanly_or_fail_with_a_validation_error(reg_mesh, field, value, drop):
    d = copy.deepcopy(_llm(model_name="mutant"))
    if drop:
        d.pop(field, None)
    else:
        d[field] = value
    try:
        reg_mesh.client.register_model("LLM", json.dumps(d))
    except InvalidRequest:
        return
    # Registered under the name it has (a mutated model_name, e.g. "x", is a valid name too): remove that one,
    # so that the next example starts from the same registry.
    reg_mesh.client.unregister_model("LLM", d["model_name"])

"""Rerank models (issue 23) and OpenAI's embedding options: the schema's two JSON forms, the request checks, and a
real mesh with a gateway serving a custom rerank model beside an embedding and an LLM instance, driven by the
Python client, the CLI, curl and xinference-client; scores compared with CrossEncoder.predict in this process."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import requests
from xinference_client import RESTfulClient

from tests.conftest import LAUNCHES, rerank_definition, served_mesh
from tests.mesh import REPO
from zinfer.services.registry.validate import validate
from zinfer.services.worker.instance.backends.cross_encoder_backend import detect_type
from zinfer.shared import compat
from zinfer.shared import protocol as p
from zinfer.shared.errors import InvalidRequest, TooLarge
from zinfer.shared.models import DefinitionError, RerankFamily, definition_to_json, parse_rerank

QUERY = "What is the largest animal in the world?"
DOCUMENTS = ["The blue whale is the largest animal that has ever lived.", "Foxes jump over lazy dogs.",
             "Octopuses have three hearts and blue blood.", "A model-serving mesh answers requests.",
             "Once upon a time there was a small village by the sea.", "Whales are mammals, not fish."]


# ---------------------------------------------------------------- the schema, without a mesh


def test_both_json_forms_parse_to_one_internal_form_and_come_back_as_given(tiny_models):
    v2, flat = rerank_definition(tiny_models), rerank_definition(tiny_models, flat=True)
    a, b = parse_rerank(v2), parse_rerank(flat)
    assert isinstance(a, RerankFamily) and isinstance(b, RerankFamily)
    assert a.spec.model_uri == b.spec.model_uri == f"file://{tiny_models['rerank']}"
    assert (a.version, b.version) == (2, 1) and a.max_tokens == 512 and b.max_tokens is None
    assert definition_to_json(a) == v2
    assert definition_to_json(b) == {**flat, "version": 1}
    # the type is optional (Xinference's default: unknown, told by the tokenizer at load)
    assert parse_rerank({k: v for k, v in v2.items() if k != "type"}).type == "unknown"


@pytest.mark.parametrize("change, field, words", [
    ({"dimension": 3}, "dimension", "unknown field"),
    ({"type": "fancy"}, "type", "valid values: LLM-based, LLM-based layerwise, normal, unknown"),
    ({"model_specs": []}, "model_specs", "length"),
    ({"model_specs": [{"model_format": "ggufv2", "model_id": "x/y", "quantization": "none"}]},
     "model_specs[0].model_format", "pytorch"),
    ({"model_specs": [{"model_format": "pytorch", "quantization": "none"}]}, "model_specs[0].model_id", "required"),
    ({"model_specs": [{"model_format": "pytorch", "model_id": "x/y", "quantizaton": "none"}]},
     "model_specs[0].quantizaton", "did you mean 'quantization'"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"language": "en"}, "language", "array"),
])
def test_bad_rerank_definitions_name_the_field(tiny_models, change, field, words):
    with pytest.raises(DefinitionError) as info:
        validate("rerank", {**rerank_definition(tiny_models), **change}, set())
    assert [p.field for p in info.value.problems] == [field]
    assert words in str(info.value)


def test_the_flat_form_names_its_own_fields(tiny_models):
    flat = rerank_definition(tiny_models, flat=True)
    with pytest.raises(DefinitionError) as info:
        validate("rerank", {**flat, "model_uri": "file:///nowhere/at/all", "model_id": None}, set())
    assert info.value.problems[0].field == "model_uri" and "/nowhere/at/all" in str(info.value)
    with pytest.raises(DefinitionError) as info:  # the two forms mixed: model_specs makes it version 2
        validate("rerank", {**flat, "model_specs": [{"model_id": "x/y"}]}, set())
    assert info.value.problems[0].field == "model_id" and "unknown field" in str(info.value)


@pytest.mark.parametrize("flat", [False, True])
def test_rerank_definitions_persist_in_the_form_they_came_in(tmp_path, tiny_models, flat):
    from zinfer.services.registry.service import parse_persisted
    from zinfer.services.registry.store import DefinitionStore

    store = DefinitionStore(tmp_path)
    definition = validate("rerank", rerank_definition(tiny_models, flat=flat), set())
    store.save("rerank", definition)
    found, bad = store.load_all("rerank", parse_persisted("rerank"))
    assert bad == [] and found == {"custom-reranker": definition}
    saved = json.loads(store.path("rerank", "custom-reranker").read_text())
    assert ("model_specs" in saved) is not flat


def test_rerank_memory_is_sized_from_its_folder(tiny_models):
    from zinfer.shared.sizing import OVERHEAD, estimate_memory, weights_bytes

    family = parse_rerank(rerank_definition(tiny_models))
    folder = tiny_models["rerank"]
    assert estimate_memory(None, None, family, "cpu", str(folder)) == int(weights_bytes(folder) * OVERHEAD)
    assert estimate_memory(None, None, family, "cuda", str(folder)) == int(weights_bytes(folder) * 0.5 * OVERHEAD)
    assert estimate_memory(None, None, family, "cpu") == 512 * 2**20  # before its files are seen


def test_a_rerank_definition_registered_as_another_type_says_which(tiny_models):
    with pytest.raises(DefinitionError) as info:
        validate("embedding", rerank_definition(tiny_models, flat=True), set())
    assert info.value.problems[0].field == "model_type" and "--model-type rerank" in str(info.value)


def test_unknown_type_is_told_by_the_tokenizer_as_xinference_does(tmp_path, tiny_models):
    assert detect_type(str(tiny_models["rerank"])) == "normal"  # a BERT tokenizer: normal, by default
    for tokenizer_class, kind in [("LlamaTokenizerFast", "LLM-based layerwise"), ("GemmaTokenizer", "LLM-based"),
                                  ("XLMRobertaTokenizerFast", "normal")]:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class}))
        assert detect_type(str(tmp_path)) == kind


@pytest.mark.parametrize("body, field", [
    ({"query": "q", "documents": []}, "documents"),
    ({"query": "q"}, "documents"),
    ({"query": "q", "documents": ["a", 3]}, "documents[1]"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ({"query": "q", "documents": ["a"], "max_chunks_per_doc": 2}, "max_chunks_per_doc"),
    ({"query": "q", "documents": ["a"], "kwargs": '{"instruction": "x"}'}, "kwargs"),
    ({"query": "q", "documents": ["a"], "return_document": True}, "return_document"),
    ({"documents": ["a"]}, "query"),
])
def test_bad_rerank_requests_name_the_field(body, field):
    with pytest.raises(InvalidRequest) as info:
        compat.rerank_body({"model": "rr", **body})
    assert info.value.field == field


def test_rerank_bodies_take_cohere_and_jina_document_objects():
    body = compat.rerank_body({"model": "rr", "query": {"text": "q"}, "documents": ["a", {"text": "b"}],
                               "top_n": None, "return_documents": None, "kwargs": "{}"})
    assert body.message().documents == ["a", "b"] and body.message().query == "q"
    assert body.return_documents is False and body.return_len is False


# ---------------------------------------------------------------- a served mesh


@pytest.fixture(scope="module")
def rr(tmp_path_factory, tiny_models):
    launches = ["rr", "emb", "gg", ("rr-flat", dict(model_name="flat-reranker", model_type="rerank"))]
    with served_mesh(tmp_path_factory, tiny_models, "rerank", [], gateway=True) as m:
        m.client.register_model("rerank", rerank_definition(tiny_models, "flat-reranker", flat=True))
        for launch in launches:
            uid, args = (launch, LAUNCHES[launch]) if isinstance(launch, str) else launch
            m.client.launch_model(model_uid=uid, **args)
        yield m


@pytest.fixture(scope="module")
def raw(tiny_models):
    """The engine itself, in this process: what the served scores must equal."""
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(tiny_models["rerank"]), device="cpu", max_length=512)


def expected(raw, documents=DOCUMENTS, query=QUERY) -> np.ndarray:
    return raw.predict([(query, d) for d in documents], convert_to_numpy=True, show_progress_bar=False)


def check_against(result: dict, scores: np.ndarray, top_n: int | None = None) -> None:
    order = list(np.argsort(scores)[::-1])[:top_n]
    assert [r["index"] for r in result["results"]] == order
    for r in result["results"]:
        assert abs(r["relevance_score"] - float(scores[r["index"]])) < 1e-5


def test_registrations_list_the_rerank_type(rr):
    items = {i["model_name"]: i for i in rr.client.list_model_registrations("rerank")}
    assert items["custom-reranker"]["rerank_type"] == "normal" and not items["custom-reranker"]["is_builtin"]
    assert items["bge-reranker-base"]["is_builtin"] and items["bge-reranker-base"]["max_tokens"] == 512
    assert rr.client.get_model_registration("rerank", "flat-reranker")["model_uri"].startswith("file://")
    listed = rr.client.list_models()
    assert listed["rr"]["model_type"] == "rerank" and listed["rr"]["model_ability"] == ["rerank"]


@pytest.mark.parametrize("uid", ["rr", "rr-flat"])
def test_python_client_scores_equal_crossencoder_predict(rr, raw, uid):
    model = rr.client.get_model(uid)
    scores = expected(raw)
    check_against(model.rerank(DOCUMENTS, QUERY), scores)
    top = model.rerank(DOCUMENTS, QUERY, top_n=2, return_documents=True, return_len=True)
    check_against(top, scores, top_n=2)
    assert [r["document"]["text"] for r in top["results"]] == [DOCUMENTS[r["index"]] for r in top["results"]]
    tokens = raw.tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS)["input_ids"]
    assert top["meta"]["tokens"] == {"input_tokens": sum(map(len, tokens)), "output_tokens": sum(map(len, tokens))}
    assert model.rerank(DOCUMENTS, QUERY)["results"][0]["document"] is None
    assert model.rerank(DOCUMENTS, QUERY)["meta"]["tokens"] is None


def test_long_pairs_are_truncated_at_max_tokens_not_refused(rr, raw):
    documents = ["whale " * 2000, "short document"]
    check_against(rr.client.get_model("rr").rerank(documents, QUERY), expected(raw, documents))


def test_concurrent_requests_batch_and_each_gets_its_own_answer(rr, raw):
    from concurrent.futures import ThreadPoolExecutor

    model = rr.new_client(timeout=60).get_model("rr")
    asks = [(DOCUMENTS[i:] + DOCUMENTS[:i], f"question {i}: {QUERY}") for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda a: model.rerank(a[0], a[1], top_n=3), asks))
    for (documents, query), answer in zip(asks, answers, strict=True):
        check_against(answer, expected(raw, documents, query), top_n=3)


def test_bad_requests_are_typed_errors_naming_the_field(rr):
    model = rr.client.get_model("rr")
    with pytest.raises(InvalidRequest) as info:
        model.rerank([], QUERY)
    assert info.value.field == "documents"
    with pytest.raises(InvalidRequest) as info:
        model.rerank(["fine", 7], QUERY)
    assert info.value.field == "documents[1]"
    with pytest.raises(TooLarge) as info:
        model.rerank(["doc"] * 1001, QUERY)  # max_rerank_documents: 1000
    assert info.value.field == "documents"
    with pytest.raises(InvalidRequest, match="rerank model: it cannot generate"):
        model.generate("hello")
    with pytest.raises(InvalidRequest, match="cannot rerank"):  # a rerank request to an embedding model
        rr.client.call_with_buffers(p.model_target("emb").encode(), compat.rerank_body(
            {"model": "emb", "query": "q", "documents": ["d"]}).message())


def test_llm_based_types_are_refused_at_launch_naming_the_type(rr, tiny_models):
    rr.client.register_model("rerank", rerank_definition(tiny_models, "gemma-like", type="LLM-based"))
    with pytest.raises(InvalidRequest) as info:
        rr.client.launch_model(model_name="gemma-like", model_type="rerank")
    assert info.value.field == "type" and "LLM-based" in str(info.value)


def test_rerank_embedding_and_llm_share_a_device_each_in_its_own_process(rr):
    listed = rr.client.list_models()
    pids = {uid: listed[uid]["pids"] for uid in ("rr", "emb", "gg")}
    assert len({tuple(listed[uid]["devices"]) for uid in pids}) == 1  # one worker: the CPU
    flat = [pid for ps in pids.values() for pid in ps]
    assert all(pid > 0 for pid in flat) and len(set(flat)) == 3
    assert os.getpid() not in flat


def test_cli_rerank(rr):
    env = dict(os.environ, ZINFER_ENDPOINT=rr.endpoint, ZINFER_HOME=str(rr.home), ZINFER_CLIENT_KEY=str(rr.admin_key))
    out = subprocess.run([sys.executable, "-m", "zinfer", "rerank", "--model-uid", "rr", "--query", QUERY,
                          *DOCUMENTS[:3], "--top-n", "2"], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    best = rr.client.get_model("rr").rerank(DOCUMENTS[:3], QUERY, top_n=2)["results"]
    assert re.findall(r"\b\d+\.\d{6}\b", out.stdout) == [f"{r['relevance_score']:.6f}" for r in best]
    assert DOCUMENTS[best[0]["index"]][:40] in out.stdout
    bad = subprocess.run([sys.executable, "-m", "zinfer", "rerank", "--model-uid", "emb", "--query", QUERY, "x"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert bad.returncode != 0 and "embedding model" in bad.stderr + bad.stdout


def test_curl_rerank_and_its_errors(rr, raw):
    def curl(body: dict, path: str = "/v1/rerank") -> tuple[int, dict]:
        out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {rr.admin_api_key}",
                              "-H", "Content-Type: application/json", "-d", json.dumps(body),
                              f"{rr.gateway_url}{path}"], capture_output=True, text=True, timeout=60)
        text, _, status = out.stdout.rpartition("\n")
        return int(status), json.loads(text)

    status, result = curl({"model": "rr", "query": QUERY, "documents": DOCUMENTS, "top_n": 3,
                           "return_documents": True})
    assert status == 200
    check_against(result, expected(raw), top_n=3)
    assert result["results"][0]["document"]["text"] == DOCUMENTS[result["results"][0]["index"]]
    status, jina = curl({"model": "rr", "query": QUERY, "documents": [{"text": d} for d in DOCUMENTS]}, "/v2/rerank")
    assert status == 200 and jina["usage"]["total_tokens"] > 0
    check_against(jina, expected(raw))
    for body, field in [({"documents": []}, "documents"), ({"documents": ["a", 3]}, "documents[1]"),
                        ({"documents": ["d"] * 1001}, "documents")]:
        status, error = curl({"model": "rr", "query": QUERY, **body})
        assert status in (400, 413) and error["error"]["param"] == field, error
    status, error = curl({"model": "no-such-uid", "query": QUERY, "documents": ["d"]})
    assert status == 404


def test_xinference_client_rerank(rr, raw):
    client = RESTfulClient(rr.gateway_url, api_key=rr.admin_api_key)
    model = client.get_model("rr")
    result = model.rerank(DOCUMENTS, QUERY, top_n=4, return_documents=True, return_len=True)
    check_against(result, expected(raw), top_n=4)
    assert result["meta"]["tokens"]["input_tokens"] > 0
    with pytest.raises(RuntimeError, match="documents"):
        model.rerank([], QUERY)


# ---------------------------------------------------------------- embeddings: dimensions and base64


def test_embedding_dimensions_cut_and_renormalise(rr):
    model = rr.client.get_model("emb")
    full = np.asarray(model.create_embedding(DOCUMENTS[:2])["data"][0]["embedding"], dtype=np.float32)
    cut = model.create_embedding(DOCUMENTS[:2], dimensions=64)
    vector = np.asarray(cut["data"][0]["embedding"], dtype=np.float32)
    assert vector.shape == (64,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    np.testing.assert_allclose(vector, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    with pytest.raises(InvalidRequest) as info:
        model.create_embedding("x", dimensions=1000)
    assert info.value.field == "dimensions" and "384" in str(info.value)


def test_embedding_base64_through_the_client_and_the_gateway(rr):
    model = rr.client.get_model("emb")
    floats = np.asarray(model.create_embedding("whales", dimensions=32)["data"][0]["embedding"], dtype=np.float32)
    packed = model.create_embedding("whales", dimensions=32, encoding_format="base64")["data"][0]["embedding"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(packed), dtype=np.float32), floats)
    r = requests.post(f"{rr.gateway_url}/v1/embeddings", timeout=60,
                      headers={"Authorization": f"Bearer {rr.admin_api_key}"},
                      json={"model": "emb", "input": "whales", "dimensions": 32, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), np.float32), floats)
    import openai

    oai = openai.OpenAI(base_url=f"{rr.gateway_url}/v1", api_key=rr.admin_api_key, max_retries=0, timeout=60)
    got = oai.embeddings.create(model="emb", input="whales", dimensions=32).data[0].embedding
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), floats, atol=1e-6)


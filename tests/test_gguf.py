"""GGUF beyond one file of an LLM: embedding models on llama.cpp (a `ggufv2` embedding spec, Xinference's version 2
JSON) whose served vectors equal llama-cpp-python's own `embed` of the same file, and LLMs split in parts
(model_file_name_split_template, quantization_parts) whose every part is found and whose first llama.cpp opens."""

from __future__ import annotations

import base64
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import served_mesh
from tests.test_dropin import cli
from tests.test_gateway import oai
from zinfer.shared.errors import InvalidRequest, NotFound, TooLarge
from zinfer.shared.tinymodels import SPLIT_PARTS, SPLIT_TEMPLATE

TEXTS = ["Hello, world!", "The blue whale is the LARGEST animal that has ever lived.", "zinfer counts: 12,345",
         "🐋 naïve café", "unbelievably", "Once upon a time there was a small village by the sea " * 6]


def gguf_embedding(models, name: str = "tiny-embed-gguf", **spec) -> dict:
    """A version 2 embedding definition with one ggufv2 spec: the tiny BERT's GGUF in its folder."""
    place = {"model_format": "ggufv2", "model_hub": "huggingface", "model_id": "zinfer/tiny-embedder-gguf",
             "model_uri": f"file://{models['embedding_gguf'].parent}", "model_revision": None, "quantization": "F32",
             "model_file_name_template": "tiny-embedder.{quantization}.gguf"}
    place.update(spec)
    return {"version": 2, "model_name": name, "dimensions": 64, "max_tokens": 512, "language": ["en"],
            "model_specs": [place], "cache_config": None, "virtualenv": None, "is_builtin": False}


def split_llm(models, name: str = "tiny-split", parts: list[str] | None = None) -> dict:
    return {"version": 2, "context_length": 2048, "model_name": name, "model_lang": ["en"],
            "model_ability": ["generate"], "model_family": "other",
            "model_specs": [{"model_format": "ggufv2", "model_size_in_billions": 1, "quantization": "F32",
                             "model_hub": "huggingface", "model_uri": f"file://{models['gguf_split_dir']}",
                             "model_file_name_template": "tiny-llama.{quantization}.gguf",
                             "model_file_name_split_template": SPLIT_TEMPLATE,
                             "quantization_parts": {"F32": parts or [p.split("F32-")[1][:-5] for p in SPLIT_PARTS]}}]}


@pytest.fixture(scope="module")
def gm(tmp_path_factory, tiny_models):
    with served_mesh(tmp_path_factory, tiny_models, "gguf", ["gg"], gateway=True) as m:
        m.client.register_model("embedding", gguf_embedding(tiny_models))
        m.client.launch_model(model_name="tiny-embed-gguf", model_type="embedding", model_uid="ge")
        yield m


@pytest.fixture(scope="module")
def raw(tiny_models):
    """llama-cpp-python's own embeddings of the same file, in the test process."""
    import llama_cpp

    llm = llama_cpp.Llama(str(tiny_models["embedding_gguf"]), embedding=True, verbose=False)
    try:
        yield np.asarray(llm.embed(TEXTS, normalize=True), dtype=np.float32)
    finally:
        llm.close()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_a_gguf_embedding_model_serves_llama_cpp_pythons_own_vectors(gm, raw, tiny_models):
    view = gm.client.describe_model("ge")
    assert view["model_format"] == "ggufv2" and view["quantization"] == "F32"
    out = oai(gm).embeddings.create(model="ge", input=TEXTS)
    served = np.asarray([d.embedding for d in out.data], dtype=np.float32)
    assert served.shape == (len(TEXTS), 64)
    assert cosines(served, raw).min() >= 0.999
    assert np.allclose(np.linalg.norm(served, axis=1), 1, atol=1e-5)  # unit length, as sentence-transformers'
    assert out.usage.prompt_tokens == sum(len(t) for t in _tokens(tiny_models['embedding_gguf'], TEXTS))
    # dimensions (cut and renormalised) and base64, as on the sentence-transformers engine
    cut = oai(gm).embeddings.create(model="ge", input=TEXTS[:2], dimensions=16, encoding_format="base64")
    vectors = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype=np.float32) for d in cut.data])
    assert vectors.shape == (2, 16) and cosines(vectors, raw[:2, :16]).min() >= 0.999


def _tokens(path, texts):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), embedding=True, verbose=False, vocab_only=True)
    try:
        return [llm.tokenize(t.encode()) for t in texts]
    finally:
        llm.close()


def test_concurrent_requests_batch_and_each_gets_its_own_rows(gm, raw):
    model = gm.client.get_model("ge")

    def one(i):
        return np.asarray(model.create_embedding(TEXTS[i % len(TEXTS)])["data"][0]["embedding"], dtype=np.float32)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(48)))
    for i, vector in enumerate(got):
        assert cosines(vector[None], raw[i % len(TEXTS)][None])[0] >= 0.999


def test_a_gguf_embedding_file_launches_by_path_and_texts_over_max_tokens_are_refused(gm, tiny_models):
    path = str(tiny_models["embedding_gguf"])
    out = cli(gm, "launch", "--model-path", path, "-n", "tiny-embed-gguf", "--model-type", "embedding",
              "--model-uid", "ge-path")
    assert out.returncode == 0, out.stderr
    try:
        view = gm.client.describe_model("ge-path")
        assert view["model_format"] == "ggufv2" and view["model_path"] == path
        model = gm.client.get_model("ge-path")
        assert len(model.create_embedding("hi")["data"][0]["embedding"]) == 64
        with pytest.raises(TooLarge) as err:
            model.create_embedding(["fine", "whale " * 600])
        assert err.value.field == "input[1]"
    finally:
        gm.client.terminate_model("ge-path")


def test_gguf_embedding_specs_are_checked_naming_the_field(gm, tiny_models):
    with pytest.raises(InvalidRequest) as err:
        gm.client.register_model("embedding", gguf_embedding(tiny_models, "bad-1", model_file_name_template=None))
    assert err.value.field == "model_specs[0].model_file_name_template"
    with pytest.raises(InvalidRequest) as err:
        gm.client.register_model("embedding", gguf_embedding(tiny_models, "bad-2", quantization="Q9_9"))
    assert err.value.field == "model_specs[0].model_uri" and "Q9_9" in str(err.value)
    wrong = gguf_embedding(tiny_models, "bad-3")
    wrong["dimensions"] = 384
    gm.client.register_model("embedding", wrong)
    try:
        with pytest.raises(InvalidRequest) as err:  # the file makes 64 dimensions: refused at load, by name
            gm.client.launch_model(model_name="bad-3", model_type="embedding", model_uid="bad-3")
        assert err.value.field == "dimensions" and "64-dimensional" in str(err.value)
        assert gm.client.describe_model("bad-3")["state"] == "failed"  # shown failed, with its cause, until terminated
    finally:
        gm.client.terminate_model("bad-3")
        gm.client.unregister_model("embedding", "bad-3")
    with pytest.raises(NotFound) as err:  # a format the registration has no spec for
        gm.client.launch_model(model_name="tiny-embed-gguf", model_type="embedding", model_format="pytorch",
                               model_uid="nope")
    assert err.value.field == "model_format"
    names = {r["model_name"] for r in gm.client.list_model_registrations("embedding")}
    assert not names & {"bad-1", "bad-2", "bad-3"}


def test_a_split_gguf_registers_launches_and_generates_as_the_one_file(gm, tiny_models):
    gm.client.register_model("LLM", split_llm(tiny_models))
    shown = gm.client.get_model_registration("LLM", "tiny-split")["model_specs"][0]
    assert shown["model_file_name_split_template"] == SPLIT_TEMPLATE and len(shown["quantization_parts"]["F32"]) == 3
    gm.client.launch_model(model_name="tiny-split", model_uid="split")
    try:
        view = gm.client.describe_model("split")
        assert view["model_format"] == "ggufv2"
        config = {"max_tokens": 12, "temperature": 0}
        whole = gm.client.get_model("gg").generate("The blue whale", config)["choices"][0]["text"]
        assert gm.client.get_model("split").generate("The blue whale", config)["choices"][0]["text"] == whole
    finally:
        gm.client.terminate_model("split")
        gm.client.unregister_model("LLM", "tiny-split")


def test_a_missing_split_part_is_refused_naming_quantization_parts(gm, tiny_models, tmp_path):
    parts = [p.split("F32-")[1][:-5] for p in SPLIT_PARTS]
    with pytest.raises(InvalidRequest) as err:
        gm.client.register_model("LLM", split_llm(tiny_models, "split-bad", parts=[*parts, "00004-of-00003"]))
    assert err.value.field == "model_specs[0].quantization_parts"
    # a part gone after registering: the launch names it, and nothing is launched
    folder = tmp_path / "split"
    shutil.copytree(tiny_models["gguf_split_dir"], folder)
    definition = split_llm(tiny_models, "split-gone")
    definition["model_specs"][0]["model_uri"] = f"file://{folder}"
    gm.client.register_model("LLM", definition)
    try:
        (folder / SPLIT_PARTS[2]).unlink()
        with pytest.raises(NotFound) as err:
            gm.client.launch_model(model_name="split-gone", model_uid="split-gone")
        assert err.value.field == "quantization_parts" and "part 3 of 3" in str(err.value)
        assert "split-gone" not in gm.client.list_models()
    finally:
        gm.client.unregister_model("LLM", "split-gone")

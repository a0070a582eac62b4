"""Batching correctness: batched results equal unbatched ones; a request that fails in a batch fails alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from shared.errors import TooLarge
from tests.conftest import embedding_definition, llm_definition
from tests.mesh import Mesh

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def bmesh(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("batching")
    m = Mesh(root / "home", root).start_all()
    c = m.client
    c.register_model("LLM", llm_definition(tiny_models))
    c.register_model("embedding", embedding_definition(tiny_models))
    c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="emb",
                   batch_wait_ms=5, max_batch_size=64)
    c.launch_model(model_name="custom-llama-2", model_format="pytorch", model_uid="cb", continuous_batching=True)
    c.launch_model(model_name="custom-llama-2", model_format="pytorch", model_uid="plain",
                   continuous_batching=False)
    c.launch_model(model_name="custom-llama-2", model_format="ggufv2", model_uid="gg")
    yield m
    m.stop()


def concurrently(n: int, fn):
    results, errors = {}, {}

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as exc:
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


SENTENCES = [f"sentence number {i} about {'whales ' * (i % 7)}and the sea" for i in range(48)]


def test_batched_embeddings_equal_unbatched(bmesh):
    model = bmesh.client.get_model("emb")
    alone = [model.embed_array(s) for s in SENTENCES]
    clients = [bmesh.new_client() for _ in range(len(SENTENCES))]
    results, errors = concurrently(len(SENTENCES), lambda i: clients[i].get_model("emb").embed_array(SENTENCES[i]))
    assert not errors
    for i in range(len(SENTENCES)):
        np.testing.assert_allclose(results[i], alone[i], atol=1e-5)
    mixed, _ = concurrently(6, lambda i: clients[i].get_model("emb").embed_array(SENTENCES[i * 5:i * 5 + 5]))
    for i in range(6):
        np.testing.assert_allclose(mixed[i], np.vstack(alone[i * 5:i * 5 + 5]), atol=1e-5)


def test_a_failing_request_in_a_batch_fails_alone(bmesh):
    clients = [bmesh.new_client() for _ in range(16)]

    def request(i):
        texts = ["word " * 600] if i == 7 else [f"fine request {i}"]
        return clients[i].get_model("emb").embed_array(texts)

    results, errors = concurrently(16, request)
    assert set(errors) == {7} and isinstance(errors[7], TooLarge)
    assert len(results) == 15 and all(r.shape == (1, 384) for r in results.values())


@pytest.mark.parametrize("uid", ["cb", "plain", "gg"])
def test_concurrent_streams_equal_their_lone_runs(bmesh, uid):
    prompts = [f"stream {i} says" for i in range(12)]
    cfg = {"max_tokens": 24, **GREEDY}
    model = bmesh.client.get_model(uid)
    alone = [model.generate(p, cfg) for p in prompts]
    clients = [bmesh.new_client() for _ in prompts]

    def stream(i):
        chunks = list(clients[i].get_model(uid).generate(prompts[i], {**cfg, "stream": True}))
        return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]

    results, errors = concurrently(len(prompts), stream)
    assert not errors
    for i, ref in enumerate(alone):
        text, last = results[i]
        assert text == ref["choices"][0]["text"]
        assert last["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"]
        assert last["usage"] == ref["usage"]


def test_each_stream_keeps_its_own_max_tokens_and_stops(bmesh):
    model = bmesh.client.get_model("cb")
    base = model.generate("hello", {"max_tokens": 30, **GREEDY})["choices"][0]["text"]
    stop = base[12:15]
    clients = [bmesh.new_client() for _ in range(8)]

    def run(i):
        cfg = {"max_tokens": 3 + i, **GREEDY} if i % 2 else {"max_tokens": 30, "stop": stop, **GREEDY}
        return clients[i].get_model("cb").generate("hello", cfg)

    results, errors = concurrently(8, run)
    assert not errors
    for i, r in results.items():
        if i % 2:
            assert r["usage"]["completion_tokens"] == 3 + i and r["choices"][0]["finish_reason"] == "length"
        else:
            assert r["choices"][0]["text"] == base[:base.find(stop)]
            assert r["choices"][0]["finish_reason"] == "stop"


def test_requests_beyond_the_parallel_sequences_queue_visibly(bmesh):
    """llama.cpp decodes n_parallel sequences together; more requests wait, and `zinfer list` shows the queue."""
    bmesh.client.launch_model(model_name="custom-llama-2", model_format="ggufv2", model_uid="gg2", n_parallel=2)
    clients = [bmesh.new_client() for _ in range(6)]
    seen = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(bmesh.client.list_models()["gg2"]["queue_depth"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    results, errors = concurrently(6, lambda i: clients[i].get_model("gg2").generate(
        "hello", {"max_tokens": 1900, "ignore_eos": True, **GREEDY}))  # each runs its 1,900 tokens
    done.set()
    watcher.join()
    assert not errors and max(seen) >= 2
    assert all(r["choices"][0]["text"] == results[0]["choices"][0]["text"] for r in results.values())
    bmesh.wait(lambda: bmesh.client.list_models()["gg2"]["queue_depth"] == 0 or None, timeout=5)
    bmesh.client.terminate_model("gg2")

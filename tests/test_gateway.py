"""The HTTP gateway, driven by the clients people use: the `openai` SDK, `xinference-client`'s RESTfulClient,
and curl. Real mesh processes and a real gateway process on loopback; outputs equal the ZMQ client's."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys

import numpy as np
import openai
import pytest
import requests
import zmq
from xinference_client import RESTfulClient

from tests.conftest import embedding_definition, llm_definition, served_mesh
from tests.mesh import REPO, Mesh
from zinfer.services.gateway.bus import Connection
from zinfer.shared import keys
from zinfer.shared import protocol as p
from zinfer.shared.config import load_settings
from zinfer.shared.payloads import GenerateConfig

PROMPT = "What is the largest animal in the world?"
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, tiny_models):
    with served_mesh(tmp_path_factory, tiny_models, "gateway", ["hf", "gg", "hf-long", "emb"], gateway=True) as m:
        m.user_api_key = keys.api_key_of(keys.read_key_file(m.user_key))
        yield m


def oai(m: Mesh, api_key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{m.gateway_url}/v1", api_key=api_key or m.admin_api_key, max_retries=0,
                         timeout=60)


# ---------------------------------------------------------------- OpenAI SDK


@pytest.mark.parametrize("uid", ["hf", "gg"])
def test_openai_completions_equal_the_zmq_client(gw, uid):
    zmq_out = gw.client.get_model(uid).generate(PROMPT, {"max_tokens": 20, **GREEDY})
    out = oai(gw).completions.create(model=uid, prompt=PROMPT, max_tokens=20, temperature=0)
    assert out.choices[0].text == zmq_out["choices"][0]["text"]
    assert out.choices[0].finish_reason == zmq_out["choices"][0]["finish_reason"]
    assert out.usage.prompt_tokens == zmq_out["usage"]["prompt_tokens"]
    assert out.usage.completion_tokens == zmq_out["usage"]["completion_tokens"]
    assert out.object == "text_completion" and out.model == uid


def test_openai_chat_streamed_and_not(gw):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about whales."}]
    zmq_out = gw.client.get_model("gg").chat(messages=messages, generate_config={"max_tokens": 24, **GREEDY})
    whole = oai(gw).chat.completions.create(model="gg", messages=messages, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == zmq_out["choices"][0]["message"]["content"]
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    chunks = list(oai(gw).chat.completions.create(model="gg", messages=messages, max_tokens=24, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == zmq_out["choices"][0]["message"]["content"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == zmq_out["choices"][0]["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == zmq_out["usage"]["completion_tokens"]
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(oai(gw).chat.completions.create(model="gg", messages=messages, max_tokens=8, stream=True))
    assert all(c.usage is None for c in plain)  # no usage chunk unless asked for


def test_openai_embeddings_equal_the_zmq_client(gw):
    texts = ["The blue whale is the largest animal.", "Octopuses have three hearts."]
    zmq_vectors = gw.client.get_model("emb").embed_array(texts)
    # Left out, the SDK asks for base64 and decodes it itself; "float" gives JSON numbers.
    for kwargs in ({}, {"encoding_format": "float"}):
        out = oai(gw).embeddings.create(model="emb", input=texts, **kwargs)
        vectors = np.array([d.embedding for d in out.data], dtype=np.float32)
        np.testing.assert_array_equal(vectors, zmq_vectors)
        assert out.usage.prompt_tokens > 0 and [d.index for d in out.data] == [0, 1]
    out = oai(gw).embeddings.create(model="emb", input=texts, encoding_format="base64")  # asked for: a string
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype=np.float32) for d in out.data])
    np.testing.assert_array_equal(decoded, zmq_vectors)


def test_openai_lists_models_and_errors_have_their_status(gw):
    assert {"hf", "gg", "emb"} <= {m.id for m in oai(gw).models.list().data}
    with pytest.raises(openai.NotFoundError) as err:
        oai(gw).completions.create(model="nope", prompt="hi", max_tokens=2)
    assert err.value.status_code == 404 and "nope" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        oai(gw).completions.create(model="gg", prompt="hi", max_tokens=0)
    assert err.value.body["param"] == "max_tokens" and err.value.body["code"] == "invalid"
    with pytest.raises(openai.APIStatusError) as err:
        oai(gw).completions.create(model="gg", prompt="hello " * 3000, max_tokens=2)
    assert err.value.status_code == 413
    with pytest.raises(openai.BadRequestError, match="top_kk"):
        oai(gw).completions.create(model="gg", prompt="hi", max_tokens=2, extra_body={"top_kk": 3})


def settled_tokens_out(m, uid, after=-1):
    def idle():
        view = m.client.describe_model(uid)
        return view if view["inflight"] == 0 and view["stats"]["tokens_out"] > after else None

    return m.wait(idle, timeout=120)["stats"]["tokens_out"]


def test_a_client_that_disconnects_cancels_its_generation(gw):
    before = settled_tokens_out(gw, "hf-long")
    stream = oai(gw).completions.create(model="hf-long", prompt="hello", max_tokens=8000, temperature=0, stream=True)
    next(iter(stream))
    stream.close()  # the HTTP connection closes: the gateway sends CANCEL on the bus
    produced = settled_tokens_out(gw, "hf-long", after=before) - before
    assert 0 < produced < 4000, produced


def test_a_disconnect_that_comes_with_a_chunk_still_cancels_the_generation(gw):
    """The race CI lost once (8,000 of 8,000 tokens generated after a disconnect): the gateway's bus stream is
    cancelled in the same turn of the event loop as its next chunk arrives. On Python 3.11 asyncio.wait_for
    swallowed such a cancel and returned the chunk, so the stream went on. Here the cancel is issued from the
    chunk's own delivery, with the gateway's Connection against the real mesh: it must end the stream and stop
    the worker."""
    settings = load_settings(endpoint=gw.endpoint, home=str(gw.home))
    key = keys.read_key_file(gw.admin_key)
    before = settled_tokens_out(gw, "hf-long")
    cancelled_before = gw.client.describe_model("hf-long")["stats"]["cancelled"]
    msg = p.Generate(model_uid="hf-long", prompt="hello",
                     config=GenerateConfig(max_tokens=8000, temperature=0, stream=True))

    async def race():
        conn = Connection(zmq.Context.instance(), settings, key)
        try:
            chunks = conn.stream(p.model_target("hf-long"), msg, 60)
            await anext(chunks)
            queue = next(w for w in conn.waiters.values() if isinstance(w, asyncio.Queue))
            while not queue.empty():  # the race is on a chunk still to come: take those already here
                await anext(chunks)
            consumer = asyncio.create_task(anext(chunks))  # it runs before any socket callback: it waits

            def deliver_then_disconnect(frames):
                asyncio.Queue.put_nowait(queue, frames)
                consumer.cancel()  # what EventStream's watcher does when the HTTP client goes away

            queue.put_nowait = deliver_then_disconnect  # no await since the queue was empty: it still is
            with pytest.raises(asyncio.CancelledError):  # not a chunk: the swallowed cancel returned one
                async with asyncio.timeout(60):
                    await consumer
        finally:
            conn.close()

    asyncio.run(race())
    produced = settled_tokens_out(gw, "hf-long", after=before) - before
    assert 0 < produced < 4000, produced
    gw.wait(lambda: gw.client.describe_model("hf-long")["stats"]["cancelled"] == cancelled_before + 1)


# ---------------------------------------------------------------- Xinference's client


def test_the_seeds_walk_through_with_xinference_client(gw, tiny_models):
    client = RESTfulClient(gw.gateway_url, api_key=gw.admin_api_key)
    model = json.dumps(llm_definition(tiny_models, "xinf-llama-2"))
    client.register_model(model_type="LLM", model=model, persist=False)
    names = {r["model_name"]: r["is_builtin"] for r in client.list_model_registrations(model_type="LLM")}
    assert names["xinf-llama-2"] is False and names["llama-2"] is True
    assert client.get_model_registration("LLM", "xinf-llama-2")["model_name"] == "xinf-llama-2"
    uid = client.launch_model(model_name="xinf-llama-2", model_format="pytorch")
    gg_uid = client.launch_model(model_name="xinf-llama-2", model_format="ggufv2", quantization="F16",
                                 model_uid="xinf-gguf")
    assert set(client.list_models()) >= {uid, gg_uid}
    for u in (uid, gg_uid):
        handle = client.get_model(model_uid=u)
        out = handle.generate(PROMPT, generate_config={"max_tokens": 16, **GREEDY})
        assert out["choices"][0]["text"] == gw.client.get_model(u).generate(PROMPT, {"max_tokens": 16, **GREEDY})[
            "choices"][0]["text"]
        chat = handle.chat(messages=[{"role": "user", "content": "Hello!"}],
                           generate_config={"max_tokens": 8, **GREEDY})
        assert chat["choices"][0]["message"]["role"] == "assistant"
        streamed = list(handle.generate(PROMPT, generate_config={"max_tokens": 16, "stream": True, **GREEDY}))
        assert "".join(c["choices"][0]["text"] for c in streamed) == out["choices"][0]["text"]
    assert client.describe_model(uid)["model_format"] == "pytorch"
    client.register_model(model_type="embedding", model=json.dumps(embedding_definition(tiny_models, "xinf-bge")),
                          persist=False)
    emb_uid = client.launch_model(model_name="xinf-bge", model_type="embedding")
    vector = client.get_model(emb_uid).create_embedding("hello")["data"][0]["embedding"]
    np.testing.assert_array_equal(np.array(vector, dtype=np.float32),
                                  gw.client.get_model(emb_uid).embed_array("hello")[0])
    for u in (uid, gg_uid, emb_uid):
        client.terminate_model(u)
    client.unregister_model(model_type="LLM", model_name="xinf-llama-2")
    client.unregister_model(model_type="embedding", model_name="xinf-bge")
    assert "xinf-llama-2" not in {r["model_name"] for r in client.list_model_registrations(model_type="LLM")}
    with pytest.raises(RuntimeError, match="no LLM model named"):  # its errors carry the server's detail
        client.launch_model(model_name="xinf-llama-2")


# ---------------------------------------------------------------- SSE, keys, operations


def test_curl_sees_server_sent_events(gw):
    body = json.dumps({"model": "gg", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", "-H", f"Authorization: Bearer {gw.admin_api_key}",
                          "-H", "Content-Type: application/json", "-d", body, f"{gw.gateway_url}/v1/completions"],
                         capture_output=True, text=True, timeout=60)
    events = out.stdout.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    expected = gw.client.get_model("gg").generate(PROMPT, {"max_tokens": 12, **GREEDY})["choices"][0]["text"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected


def test_keys_and_roles_over_http(gw, tiny_models):
    url = f"{gw.gateway_url}/v1/models"
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer zk-not-a-key"}, timeout=30).status_code == 401
    user = {"Authorization": f"Bearer {gw.user_api_key}"}
    assert requests.get(url, headers=user, timeout=30).status_code == 200
    launch = requests.post(url, json={"model_name": "custom-llama-2", "model_format": "ggufv2"}, headers=user,
                           timeout=30)
    assert launch.status_code == 403 and launch.json()["error"]["type"] == "permission_error"
    register = requests.post(f"{gw.gateway_url}/v1/model_registrations/LLM", headers=user, timeout=30,
                             json={"model": json.dumps(llm_definition(tiny_models, "by-user")), "persist": False})
    assert register.status_code == 403
    # A key made with `zinfer keys create` works at once; revoked, it is refused.
    out = subprocess.run([sys.executable, "-m", "zinfer", "keys", "create", "carol", "--role", "user"],
                         capture_output=True, text=True, cwd=REPO, env=gw.env, timeout=60)
    api_key = next(line.split()[-1] for line in out.stdout.splitlines() if "API key" in line)
    assert oai(gw, api_key).completions.create(model="gg", prompt="hi", max_tokens=2,
                                        temperature=0).usage.completion_tokens == 2
    subprocess.run([sys.executable, "-m", "zinfer", "keys", "revoke", "carol"], check=True, capture_output=True,
                   cwd=REPO, env=gw.env, timeout=60)

    def refused():
        status = requests.get(url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30).status_code
        return status if status == 401 else None

    assert gw.wait(refused, timeout=10) == 401


def test_health_ready_and_metrics(gw):
    assert requests.get(f"{gw.gateway_url}/health", timeout=30).json() == {"status": "ok"}
    ready = requests.get(f"{gw.gateway_url}/ready", timeout=30).json()
    assert ready["ready"] and ready["registry"] and ready["scheduler"] and ready["workers"] == ["worker/cpu"]
    assert requests.get(f"{gw.gateway_url}/metrics", timeout=30).status_code == 401
    oai(gw).completions.create(model="gg", prompt="hi", max_tokens=3, temperature=0)
    with pytest.raises(openai.NotFoundError):  # counted by its type, whatever ran before this test
        oai(gw).completions.create(model="no-such-model", prompt="hi", max_tokens=3)
    text = requests.get(f"{gw.gateway_url}/metrics", headers={"Authorization": f"Bearer {gw.admin_api_key}"},
                        timeout=30).text
    for needle in ('zinfer_http_requests_total{method="POST",route="/v1/completions",status="200"}',
                   'zinfer_instance_state{model_name="custom-llama-2",model_type="LLM",model_uid="gg",state="ready"} '
                   '1.0', "zinfer_instance_queue_depth", "zinfer_instance_tokens_out_total",
                   'zinfer_gateway_tokens_total{direction="out",model="gg"}', "zinfer_http_request_seconds_bucket",
                   'zinfer_http_errors_total{type="not_found"}'):
        assert needle in text, needle
    schema = requests.get(f"{gw.gateway_url}/openapi.json", timeout=30).json()
    assert schema["info"]["title"] == "zinfer gateway"
    assert {"/v1/chat/completions", "/v1/embeddings", "/v2/rerank", "/v1/messages"} <= set(schema["paths"])


def test_without_gateway_auth_anonymous_callers_are_users_only(tmp_path, tiny_models):
    m = Mesh(tmp_path / "home", tmp_path)
    (tmp_path / "z.toml").write_text("gateway_auth = false\n")
    m.env["ZINFER_CONFIG"] = str(tmp_path / "z.toml")
    m.start_all()
    try:
        m.start_gateway()
        assert requests.get(f"{m.gateway_url}/v1/cluster/auth", timeout=30).json() == {"auth": False}
        assert requests.get(f"{m.gateway_url}/v1/models", timeout=30).json() == {"object": "list", "data": []}
        r = requests.post(f"{m.gateway_url}/v1/model_registrations/LLM", timeout=30,
                          json={"model": json.dumps(llm_definition(tiny_models)), "persist": False})
        assert r.status_code == 403  # never an admin
    finally:
        m.stop()



def test_a_full_broker_queue_is_429_over_http_and_queue_full_in_python(tmp_path, tiny_models):
    """The broker holds no request for a target nothing serves (park_max_requests = 0): while the instance is
    stopped (SIGSTOP, so the broker drops it after the liveness window), its requests meet a full queue. HTTP
    answers 429 and the Python client raises QueueFull, never 'the model is not running' (both used to read the
    broker's text, which starts "nothing serves" for a full queue too)."""
    import os
    import signal

    from zinfer.shared.errors import QueueFull, ZinferError

    m = Mesh(tmp_path / "home", tmp_path)
    m.env["ZINFER_PARK_MAX_REQUESTS"] = "0"
    m.start_all()
    pid = None
    try:
        m.start_gateway()
        c = m.client
        c.register_model("embedding", embedding_definition(tiny_models))
        c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="emb")
        model = m.new_client(timeout=10).get_model("emb")
        assert len(model.create_embedding("ready")["data"]) == 1
        pid = m.wait(lambda: c.describe_model("emb")["pids"][0] or None, timeout=30)
        os.kill(pid, signal.SIGSTOP)

        def python_sees_queue_full():
            try:
                model.create_embedding("anyone?")
            except QueueFull:
                return True
            except ZinferError:  # held by the stopped process until the broker drops it: unavailable, timeout
                return False
            return False  # answered: the signal had not landed yet

        m.wait(python_sees_queue_full, timeout=60)
        headers = {"Authorization": f"Bearer {keys.api_key_of(keys.read_key_file(m.admin_key))}"}
        r = requests.post(f"{m.gateway_url}/v1/embeddings", headers=headers, timeout=30,
                          json={"model": "emb", "input": "anyone?"})
        assert r.status_code == 429, r.text
        assert "queue" in r.json()["error"]["message"]
        os.kill(pid, signal.SIGCONT)
        pid = None
        m.wait(lambda: len(model.create_embedding("back")["data"]) == 1, timeout=60)
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        m.stop()

"""generate, chat and embed end to end through the real mesh, checked against the raw libraries."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from tests.conftest import llm_definition, served_mesh
from tests.mesh import REPO
from zinfer.shared.errors import InvalidRequest, TooLarge

PROMPT = "What is the largest animal in the world?"
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models):
    """One mesh with the tiny model launched in both formats, MiniLM, and a long-context llama.cpp model."""
    with served_mesh(tmp_path_factory, tiny_models, "infer", ["hf", "gg", "hf-long", "gg-long", "emb"],
                     llm={"model_ability": ["generate", "chat", "embed"]}) as m:
        yield m


@pytest.fixture(scope="module")
def raw_hf(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["pytorch"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["pytorch"], dtype=torch.float32).eval()

    def generate(prompt: str, max_new_tokens: int) -> tuple[str, int]:
        ids = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        new = out[0][ids.input_ids.shape[1]:]
        return tok.decode(new, skip_special_tokens=True), len(new)

    generate.tokenizer = tok
    return generate


@pytest.fixture(scope="module")
def raw_llama(tiny_models):
    from llama_cpp import Llama

    return Llama(model_path=str(tiny_models["gguf"]), n_ctx=2048, verbose=False)


# ---------------------------------------------------------------- generate


def test_completion_object_and_raw_equality_transformers(served, raw_hf):
    out = served.client.get_model("hf").generate(PROMPT, {"max_tokens": 30, **GREEDY})
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion" and out["model"] == "hf"
    assert isinstance(out["created"], int)
    (choice,) = out["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    text, n = raw_hf(PROMPT, 30)
    assert choice["text"] == text
    assert out["usage"] == {"prompt_tokens": len(raw_hf.tokenizer(PROMPT).input_ids), "completion_tokens": n,
                            "total_tokens": out["usage"]["prompt_tokens"] + n}


def test_raw_equality_llama_cpp(served, raw_llama):
    for prompt in (PROMPT, "Once upon a time", "The quick brown fox"):
        out = served.client.get_model("gg").generate(prompt, {"max_tokens": 40, **GREEDY})
        raw = raw_llama.create_completion(prompt, max_tokens=40, temperature=0)
        assert out["choices"][0]["text"] == raw["choices"][0]["text"]
        assert out["choices"][0]["finish_reason"] == raw["choices"][0]["finish_reason"]
        assert out["usage"]["prompt_tokens"] == raw["usage"]["prompt_tokens"]


def test_a_call_while_a_stream_is_open_on_the_same_client_loses_no_chunk(served):
    """One thread, one connection: the chunks that arrive while another call is read wait for the stream (they
    were dropped, and the stream waited out its timeout for an end that had come)."""
    model = served.client.get_model("hf")
    whole = model.generate(PROMPT, {"max_tokens": 25, **GREEDY})["choices"][0]["text"]
    stream = model.generate(PROMPT, {"max_tokens": 25, "stream": True, "stream_interval_ms": 0, **GREEDY})
    first = next(stream)
    assert "hf" in served.client.list_models()  # meanwhile the stream's other chunks arrive
    assert first["choices"][0]["text"] + "".join(c["choices"][0]["text"] for c in stream) == whole


@pytest.mark.parametrize("uid", ["hf", "gg"])
def test_streaming_order_and_end(served, uid):
    model = served.client.get_model(uid)
    whole = model.generate(PROMPT, {"max_tokens": 25, **GREEDY})
    chunks = list(model.generate(PROMPT, {"max_tokens": 25, "stream": True, "stream_interval_ms": 0, **GREEDY}))
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == whole["usage"]
    assert len(chunks) >= 10  # one chunk per token (bar incomplete UTF-8), not one blob
    # Coalesced streaming (the default window) carries the same text in fewer or as many chunks.
    merged = list(model.generate(PROMPT, {"max_tokens": 25, "stream": True, "stream_interval_ms": 50, **GREEDY}))
    assert "".join(c["choices"][0]["text"] for c in merged) == whole["choices"][0]["text"]
    assert len(merged) <= len(chunks)


@pytest.mark.parametrize("uid", ["hf", "gg"])
def test_max_tokens_gives_length(served, uid):
    out = served.client.get_model(uid).generate("hello", {"max_tokens": 7, **GREEDY})
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 7


@pytest.mark.parametrize("uid", ["hf", "gg"])
def test_stop_words_end_generation_and_are_not_returned(served, uid):
    model = served.client.get_model(uid)
    text = model.generate("hello", {"max_tokens": 40, **GREEDY})["choices"][0]["text"]
    visible = [i for i, ch in enumerate(text) if ch.isalpha() and i > 5]
    cut = visible[len(visible) // 2]
    stop = text[cut:cut + 3]
    expected = text[:text.find(stop)]
    out = model.generate("hello", {"max_tokens": 40, "stop": [stop, "never-appears"], **GREEDY})
    assert out["choices"][0]["text"] == expected and out["choices"][0]["finish_reason"] == "stop"
    streamed = list(model.generate("hello", {"max_tokens": 40, "stop": stop, "stream": True, **GREEDY}))
    assert "".join(c["choices"][0]["text"] for c in streamed) == expected
    assert streamed[-1]["choices"][0]["finish_reason"] == "stop"


def test_requests_beyond_context_length_are_refused_with_numbers(served):
    model = served.client.get_model("hf")
    with pytest.raises(TooLarge, match=r"max_tokens is 2048: \d+ > context_length 2048"):
        model.generate(PROMPT, {"max_tokens": 2048})
    with pytest.raises(TooLarge, match="context_length is 2048"):
        model.generate("hello " * 3000, {"max_tokens": 1})
    with pytest.raises(InvalidRequest, match="generate_config"):
        model.generate(PROMPT, {"max_tokenz": 3})


def test_seeded_sampling_is_reproducible(served):
    for uid in ("hf", "gg"):
        model = served.client.get_model(uid)
        cfg = {"max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 42}
        assert model.generate(PROMPT, cfg)["choices"][0]["text"] == model.generate(PROMPT, cfg)["choices"][0]["text"]


# ---------------------------------------------------------------- chat

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a big animal."}]


def test_chat_uses_the_registered_template_and_equals_raw(served, raw_hf):
    out = served.client.get_model("hf").chat(messages=MESSAGES, generate_config={"max_tokens": 20, **GREEDY})
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant"
    prompt = raw_hf.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    text, n = raw_hf(prompt, 20)
    assert message["content"] == text and out["usage"]["completion_tokens"] == n


def test_chat_streaming(served):
    model = served.client.get_model("gg")
    whole = model.chat(messages=MESSAGES, generate_config={"max_tokens": 15, **GREEDY})
    chunks = list(model.chat(messages=MESSAGES, generate_config={"max_tokens": 15, "stream": True, **GREEDY}))
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == whole["usage"]


def test_chat_with_a_prompt_style_and_its_stop_words(served, tiny_models):
    c = served.client
    d = llm_definition(tiny_models, "styled", model_ability=["chat"], context_length=1024)
    d.pop("chat_template")
    d["prompt_style"] = {"style_name": "ADD_COLON_TWO", "system_prompt": "SYS", "roles": ["USER", "BOT"],
                         "intra_message_sep": " ", "inter_message_sep": "</s>", "stop": ["never-seen"]}
    c.register_model("LLM", d)
    c.launch_model(model_name="styled", model_format="ggufv2", model_uid="styled")
    try:
        model = c.get_model("styled")
        out = model.chat(messages=[{"role": "user", "content": "hi"}], generate_config={"max_tokens": 5, **GREEDY})
        # ADD_COLON_TWO lays the chat out as "SYS USER: hi BOT:"
        from llama_cpp import Llama

        raw = Llama(model_path=str(tiny_models["gguf"]), n_ctx=1024, verbose=False)
        expected = raw.create_completion("SYS USER: hi BOT:", max_tokens=5, temperature=0)
        assert out["choices"][0]["message"]["content"] == expected["choices"][0]["text"]
        assert out["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]
        # The legacy chat(prompt, chat_history) form works too.
        legacy = model.chat("hi", generate_config={"max_tokens": 5, **GREEDY})
        assert legacy["choices"][0]["message"]["content"] == out["choices"][0]["message"]["content"]
        with pytest.raises(InvalidRequest, match="role"):
            model.chat(messages=[{"role": "wizard", "content": "x"}])
    finally:
        c.terminate_model("styled")


def test_generate_only_model_refuses_chat(served, tiny_models):
    c = served.client
    c.register_model("LLM", llm_definition(tiny_models, "gen-only", model_ability=["generate"]))
    c.launch_model(model_name="gen-only", model_format="ggufv2", model_uid="gen-only")
    try:
        with pytest.raises(InvalidRequest, match="cannot chat"):
            c.get_model("gen-only").chat(messages=[{"role": "user", "content": "x"}])
    finally:
        c.terminate_model("gen-only")


# ---------------------------------------------------------------- embeddings


def test_embeddings_equal_sentence_transformers(served, tiny_models):
    from sentence_transformers import SentenceTransformer

    texts = ["The blue whale is the largest animal.", "hello", "zinfer serves models over ZeroMQ " * 5]
    out = served.client.get_model("emb").create_embedding(texts)
    assert out["object"] == "list" and out["model"] == "emb"
    assert [d["index"] for d in out["data"]] == [0, 1, 2] and out["data"][0]["object"] == "embedding"
    served_vectors = np.array([d["embedding"] for d in out["data"]], dtype=np.float32)
    raw = SentenceTransformer(str(tiny_models["embedding"]), device="cpu").encode(texts)
    assert served_vectors.shape == (3, 384)
    np.testing.assert_allclose(served_vectors, raw, atol=1e-5)
    assert out["usage"]["prompt_tokens"] > 10
    single = served.client.get_model("emb").create_embedding("hello")
    np.testing.assert_allclose(single["data"][0]["embedding"], raw[1], atol=1e-5)


def test_embedding_errors(served):
    model = served.client.get_model("emb")
    with pytest.raises(InvalidRequest, match="input"):
        model.create_embedding([])
    with pytest.raises(TooLarge, match=r"input\[1\] has \d+ tokens; this model takes at most 256"):
        model.create_embedding(["short", "word " * 400])
    assert len(model.create_embedding("still fine")["data"]) == 1


@pytest.mark.parametrize("uid", ["hf", "gg"])
def test_llm_with_embed_ability(served, uid):
    out = served.client.get_model(uid).create_embedding(["a", "bb"])
    dims = {len(d["embedding"]) for d in out["data"]}
    assert dims == {64} and out["usage"]["prompt_tokens"] > 0


# ---------------------------------------------------------------- disconnects


def _inflight(client, uid):
    return client.describe_model(uid)["inflight"]


def settled_tokens_out(m, uid: str, after: int = -1) -> int:
    """The instance's generated-token count, from a report that shows it idle (the same report carries both, so
    the count is complete) and, with `after`, that counted tokens made since that earlier count."""

    def idle():
        view = m.client.describe_model(uid)
        return view if view["inflight"] == 0 and view["stats"]["tokens_out"] > after else None

    return m.wait(idle, timeout=120)["stats"]["tokens_out"]


LONG = 8000  # of the long-context models' 8,192: seconds of generation if it were left to run


@pytest.mark.parametrize("uid", ["hf-long", "gg-long"])
def test_closing_a_stream_stops_its_generation(served, uid):
    before = settled_tokens_out(served, uid)
    stream = served.client.get_model(uid).generate("hello", {"max_tokens": LONG, "stream": True, **GREEDY})
    next(stream)
    next(stream)
    stream.close()  # the client sends CANCEL; the worker drops the sequence at its next step
    produced = settled_tokens_out(served, uid, after=before) - before
    assert 0 < produced < LONG / 2, produced


CLIENT_SCRIPT = """
import sys
from zinfer.shared.client import Client
c = Client(sys.argv[1], key=sys.argv[2])
for i, chunk in enumerate(c.get_model("hf-long").generate("hello", {"max_tokens": 8000, "temperature": 0,
                                                                  "stream": True})):
    if i == 2:
        print("streaming", flush=True)
"""


def test_a_client_process_that_dies_mid_stream_stops_its_generation(served):
    before = settled_tokens_out(served, "hf-long")
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, served.endpoint, str(served.admin_key)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "streaming"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The broker cannot deliver the next chunk to a client that is gone: it cancels the work it started.
    produced = settled_tokens_out(served, "hf-long", after=before) - before
    assert 0 < produced < LONG / 2, produced


def test_concurrent_requests_to_one_instance(served):
    results = {}

    def run(i):
        client = served.new_client()
        results[i] = client.get_model("gg").generate(f"request {i}", {"max_tokens": 8, **GREEDY})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r["usage"]["completion_tokens"] <= 8 for r in results.values())


# ---------------------------------------------------------------- CLI


def zinfer(mesh, *args, input=None):
    return subprocess.run([sys.executable, "-m", "zinfer", *args], capture_output=True, text=True, cwd=REPO,
                          env=mesh.env, input=input, timeout=120)


def test_cli_generate_chat_embed(served):
    expected = served.client.get_model("gg").generate("hello", {"max_tokens": 10, **GREEDY})["choices"][0]["text"]
    out = zinfer(served, "generate", "--model-uid", "gg", "--max-tokens", "10", "--temperature", "0", "hello")
    assert out.returncode == 0 and out.stdout == expected + "\n"
    out = zinfer(served, "generate", "-u", "gg", "--max-tokens", "10", "--temperature", "0", "--no-stream",
                 input="hello\n\n")
    assert out.returncode == 0 and expected in out.stdout
    out = zinfer(served, "chat", "--model-uid", "gg", "--max-tokens", "5", "--temperature", "0",
                 input="hi\nand again\n\n")
    assert out.returncode == 0 and out.stdout.count("Assistant: ") == 2
    out = zinfer(served, "embed", "--model-uid", "emb", "first text", "second")
    assert out.returncode == 0 and "dim=384" in out.stdout and "[1]" in out.stdout
    out = zinfer(served, "generate", "--model-uid", "nope", "x")
    assert out.returncode == 1 and "nope" in out.stderr and "Traceback" not in out.stderr

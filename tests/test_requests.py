"""The request fields of OpenAI and Xinference, through the mesh, each against the raw engine's own result:
presence/frequency penalties, n, logprobs, echo, min_tokens, ignore_eos, response_format, chat content parts.
Where an engine cannot do a field, the refusal names the field and the engine."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.conftest import served_mesh
from zinfer.shared.errors import InvalidRequest
from zinfer.shared.tinyvision import png

PROMPT = "Once upon a time"
GREEDY = {"temperature": 0}
STOPS_EARLY_HF = "story you blue the"  # the tiny model ends this with </s> after 16 tokens
STOPS_EARLY_LLAMA = "is"  # ... and this after 50


@pytest.fixture(scope="module")
def rq(tmp_path_factory, tiny_models):
    with served_mesh(tmp_path_factory, tiny_models, "requests", ["hf", "gg"]) as m:
        yield m


@pytest.fixture(scope="module")
def raw_llama(tiny_models):
    from llama_cpp import Llama

    return Llama(model_path=str(tiny_models["gguf"]), n_ctx=2048, verbose=False, logits_all=True)


@pytest.fixture(scope="module")
def raw_hf(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["pytorch"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["pytorch"], dtype=torch.float32).eval()

    def generate(prompt: str, **kwargs):
        ids = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=False, pad_token_id=tok.eos_token_id, return_dict_in_generate=True,
                                 **kwargs)
        new = out.sequences[0][ids.input_ids.shape[1]:]
        return tok.decode(new, skip_special_tokens=True), new.tolist(), out

    generate.tokenizer = tok
    return generate


def text(out) -> str:
    return out["choices"][0]["text"]


def raw_llama_loop(llm, prompt: str, max_tokens: int, stop_at_end: bool = True, **kwargs) -> tuple[str, int]:
    """Greedy tokens from llama-cpp-python's own generation loop (Llama.generate), cut at max_tokens or an end
    token. create_completion would do the same but goes on past max_tokens to finish a multi-byte character."""
    import llama_cpp

    llm.reset()
    tokens = []
    for token in llm.generate(llm.tokenize(prompt.encode()), temp=0, **kwargs):
        if stop_at_end and llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        tokens.append(token)
        if len(tokens) == max_tokens:
            break
    return llm.detokenize(tokens).decode("utf-8", errors="ignore"), len(tokens)


# ---------------------------------------------------------------- penalties


def test_presence_and_frequency_penalties_equal_llama_cpp(rq, raw_llama):
    cfg = {"max_tokens": 40, "presence_penalty": 1.5, "frequency_penalty": 1.0}
    served = rq.client.get_model("gg").generate(PROMPT, {**cfg, **GREEDY})
    raw = raw_llama.create_completion(PROMPT, temperature=0, **cfg)
    assert text(served) == raw["choices"][0]["text"]
    assert text(served) != text(rq.client.get_model("gg").generate(PROMPT, {"max_tokens": 40, **GREEDY}))


def test_presence_and_frequency_penalties_on_transformers_follow_openai(rq, tiny_models):
    """OpenAI's definition, over the last 64 generated tokens as llama.cpp counts them: a greedy loop over the raw
    model that subtracts count * frequency + presence from each seen token's logit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["pytorch"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["pytorch"], dtype=torch.float32).eval()
    prompt, out = tok(PROMPT).input_ids, []
    for _ in range(40):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
        recent = out[-64:]
        for token in set(recent):
            logits[token] -= recent.count(token) * 1.0 + 1.5
        out.append(int(torch.argmax(logits)))
        if out[-1] == tok.eos_token_id:
            break
    cfg = {"max_tokens": 40, "presence_penalty": 1.5, "frequency_penalty": 1.0}
    served = rq.client.get_model("hf").generate(PROMPT, {**cfg, **GREEDY})
    assert served["usage"]["completion_tokens"] == len(out)
    assert text(served) == tok.decode(out, skip_special_tokens=True)
    assert text(served) != text(rq.client.get_model("hf").generate(PROMPT, {"max_tokens": 40, **GREEDY}))


# ---------------------------------------------------------------- n


@pytest.mark.parametrize("uid", ["hf", "gg"])
def test_n_choices_greedy_each_equal_the_lone_run(rq, uid):
    model = rq.client.get_model(uid)
    lone = model.generate(PROMPT, {"max_tokens": 20, **GREEDY})
    out = model.generate(PROMPT, {"max_tokens": 20, "n": 3, **GREEDY})
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert all(c["text"] == text(lone) for c in out["choices"])
    assert out["usage"]["completion_tokens"] == 3 * lone["usage"]["completion_tokens"]
    streamed = list(model.generate(PROMPT, {"max_tokens": 20, "n": 2, "stream": True, **GREEDY}))
    for index in (0, 1):
        assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"][0]["index"] == index) == \
            text(lone)
    assert streamed[-1]["usage"]["completion_tokens"] == 2 * lone["usage"]["completion_tokens"]


@pytest.mark.parametrize("uid", ["hf", "gg"])
def test_n_sampled_choices_are_seeded(rq, uid):
    model = rq.client.get_model(uid)
    cfg = {"max_tokens": 24, "n": 2, "temperature": 1.0, "seed": 7}
    first, again = model.generate(PROMPT, cfg), model.generate(PROMPT, cfg)
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert first["choices"][0]["text"] != first["choices"][1]["text"]  # seed, seed + 1


# ---------------------------------------------------------------- logprobs


def test_completion_logprobs_equal_llama_cpp(rq, raw_llama):
    served = rq.client.get_model("gg").generate(PROMPT, {"max_tokens": 10, "logprobs": 3, **GREEDY})
    raw = raw_llama.create_completion(PROMPT, max_tokens=10, temperature=0, logprobs=3)
    mine, theirs = served["choices"][0]["logprobs"], raw["choices"][0]["logprobs"]
    assert mine["tokens"] == theirs["tokens"]
    np.testing.assert_allclose(mine["token_logprobs"], theirs["token_logprobs"], rtol=1e-6, atol=1e-6)
    for a, b in zip(mine["top_logprobs"], theirs["top_logprobs"], strict=True):
        assert set(a) == set(b)
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-6, atol=1e-6)


def test_completion_logprobs_equal_transformers(rq, raw_hf):
    import torch

    served = rq.client.get_model("hf").generate(PROMPT, {"max_tokens": 10, "logprobs": 2, **GREEDY})
    _text, tokens, out = raw_hf(PROMPT, max_new_tokens=10, output_logits=True)
    raw = [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]
    lp = served["choices"][0]["logprobs"]
    np.testing.assert_allclose(lp["token_logprobs"], [float(r[t]) for r, t in zip(raw, tokens, strict=True)],
                               rtol=1e-4, atol=1e-4)
    tok = raw_hf.tokenizer
    for top, row in zip(lp["top_logprobs"], raw, strict=True):
        best = torch.topk(row, 2).indices.tolist()
        assert {tok.decode([i]) for i in best} <= set(top)


def test_chat_logprobs_and_top_logprobs(rq):
    out = rq.client.get_model("gg").chat([{"role": "user", "content": "Hello!"}],
                                         {"max_tokens": 6, "logprobs": True, "top_logprobs": 3, **GREEDY})
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"]
    for item in content:
        assert len(item["top_logprobs"]) == 3 and item["logprob"] <= 0
        assert item["top_logprobs"][0]["logprob"] == pytest.approx(item["logprob"])  # greedy: the best one
        assert bytes(item["bytes"]).decode() == item["token"]
    with pytest.raises(InvalidRequest, match="top_logprobs needs logprobs"):
        rq.client.get_model("gg").chat([{"role": "user", "content": "Hi"}], {"top_logprobs": 2})


# ---------------------------------------------------------------- echo


def test_echo_puts_the_prompt_first(rq, raw_llama, raw_hf):
    served = rq.client.get_model("gg").generate(PROMPT, {"max_tokens": 12, "echo": True, **GREEDY})
    assert text(served) == raw_llama.create_completion(PROMPT, max_tokens=12, temperature=0, echo=True)[
        "choices"][0]["text"]
    served = rq.client.get_model("hf").generate(PROMPT, {"max_tokens": 12, "echo": True, **GREEDY})
    assert text(served) == PROMPT + raw_hf(PROMPT, max_new_tokens=12)[0]
    streamed = list(rq.client.get_model("hf").generate(PROMPT, {"max_tokens": 12, "echo": True, "stream": True,
                                                               **GREEDY}))
    assert streamed[0]["choices"][0]["text"].startswith(PROMPT)
    assert "".join(text(c) for c in streamed) == text(served)


# ---------------------------------------------------------------- min_tokens, ignore_eos


def test_min_tokens_equal_the_raw_engines(rq, raw_hf, raw_llama):
    served = rq.client.get_model("hf").generate(STOPS_EARLY_HF, {"max_tokens": 60, "min_tokens": 30, **GREEDY})
    raw_text, raw_tokens, _ = raw_hf(STOPS_EARLY_HF, max_new_tokens=60, min_new_tokens=30)
    assert text(served) == raw_text and served["usage"]["completion_tokens"] == len(raw_tokens) >= 30

    import llama_cpp

    eog = [t for t in range(raw_llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(raw_llama._model.vocab, t)]
    start = len(raw_llama.tokenize(STOPS_EARLY_LLAMA.encode()))

    def hold_off_end(input_ids, scores):  # the raw engine's own hook: no end token before 55 tokens
        if len(input_ids) - start < 55:
            scores[eog] = -np.inf
        return scores

    served = rq.client.get_model("gg").generate(STOPS_EARLY_LLAMA, {"max_tokens": 80, "min_tokens": 55, **GREEDY})
    raw_text, raw_count = raw_llama_loop(raw_llama, STOPS_EARLY_LLAMA, 80, logits_processor=[hold_off_end])
    assert text(served) == raw_text
    assert served["usage"]["completion_tokens"] == raw_count >= 55


def test_ignore_eos_runs_to_max_tokens_as_the_raw_engines_do(rq, raw_hf, raw_llama):
    served = rq.client.get_model("hf").generate(STOPS_EARLY_HF, {"max_tokens": 40, "ignore_eos": True, **GREEDY})
    raw_text, raw_tokens, _ = raw_hf(STOPS_EARLY_HF, max_new_tokens=40, eos_token_id=None)
    assert text(served) == raw_text and served["usage"]["completion_tokens"] == len(raw_tokens) == 40
    assert served["choices"][0]["finish_reason"] == "length"

    served = rq.client.get_model("gg").generate(STOPS_EARLY_LLAMA, {"max_tokens": 70, "ignore_eos": True, **GREEDY})
    raw_text, raw_count = raw_llama_loop(raw_llama, STOPS_EARLY_LLAMA, 70, stop_at_end=False)
    assert text(served) == raw_text and served["usage"]["completion_tokens"] == raw_count == 70


# ---------------------------------------------------------------- response_format


SCHEMA = {"type": "object", "properties": {"animal": {"type": "string", "maxLength": 12},
                                          "legs": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["animal", "legs"], "additionalProperties": False}
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _matcher(lltok, schema: dict):
    import llguidance

    return llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps({**schema, "x-guidance": JSON_STYLE})))


def _allowed(matcher, n_vocab: int):
    import numpy as np

    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return bits[:n_vocab].astype(bool)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # llguidance calls llama_token_get_attr
def test_json_schema_on_llama_cpp_equals_its_own_loop_with_llguidance(rq, raw_llama):
    """Served: llguidance's masks inside zinfer's batch. Raw: llama-cpp-python's own generate() with a logits
    processor that applies llguidance's masks (the library, called here directly)."""
    import llguidance.llamacpp
    import numpy as np

    model = rq.client.get_model("gg")
    for schema in ({"type": "object"}, SCHEMA):
        rf = {"type": "json_object"} if schema == {"type": "object"} else \
            {"type": "json_schema", "json_schema": {"name": "animal", "schema": schema}}
        served = model.generate(PROMPT, {"max_tokens": 60, "response_format": rf, **GREEDY})
        matcher = _matcher(llguidance.llamacpp.lltokenizer_from_vocab(raw_llama._model.vocab), schema)
        seen = []

        def processor(ids, logits, matcher=matcher, seen=seen):
            if len(ids) > len(seen) and seen:  # the token chosen last time
                matcher.consume_token(int(ids[-1]))
            seen[:] = list(ids)
            logits[~_allowed(matcher, logits.shape[0])] = -np.inf
            return logits

        raw_text, _ = raw_llama_loop(raw_llama, PROMPT, 60, logits_processor=[processor])
        assert text(served) == raw_text
        json.loads(text(served))
    assert json.loads(text(served)).keys() == {"animal", "legs"}
    with pytest.raises(InvalidRequest, match="response_format"):
        model.generate(PROMPT, {"response_format": {"type": "xml"}})


def test_json_schema_on_transformers_equals_a_raw_loop_with_llguidance(rq, tiny_models):
    import llguidance.hf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_models["pytorch"]))
    raw = AutoModelForCausalLM.from_pretrained(str(tiny_models["pytorch"])).eval()
    matcher = _matcher(llguidance.hf.from_tokenizer(tok, n_vocab=raw.config.vocab_size), SCHEMA)
    ids = tok(PROMPT).input_ids
    out = []
    with torch.no_grad():
        while len(out) < 60 and not matcher.is_stopped():
            logits = raw(torch.tensor([ids + out])).logits[0, -1].float()
            logits[~torch.from_numpy(_allowed(matcher, logits.shape[0]))] = -float("inf")
            out.append(int(torch.argmax(logits)))
            if out[-1] == tok.eos_token_id:
                out.pop()
                break
            matcher.consume_token(out[-1])
    served = rq.client.get_model("hf").generate(PROMPT, {"max_tokens": 60, **GREEDY, "response_format": {
        "type": "json_schema", "json_schema": {"name": "animal", "schema": SCHEMA}}})
    assert text(served) == tok.decode(out, skip_special_tokens=True)
    assert set(json.loads(text(served))) == {"animal", "legs"}


# ---------------------------------------------------------------- chat content


def test_chat_content_parts_and_null_content(rq):
    model = rq.client.get_model("gg")
    plain = model.chat([{"role": "user", "content": "Hello\nthere"}], {"max_tokens": 8, **GREEDY})
    parts = model.chat([{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                     {"type": "text", "text": "there"}]}], {"max_tokens": 8, **GREEDY})
    assert parts["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
               {"role": "user", "content": "Again"}]
    assert model.chat(history, {"max_tokens": 4, **GREEDY})["usage"]["completion_tokens"] == 4
    with pytest.raises(InvalidRequest, match="'x' URLs are not taken") as err:
        model.chat([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                 {"type": "image_url", "image_url": {"url": "x"}}]}])
    assert err.value.field == "messages[0].content[1].image_url"
    image = "data:image/png;base64," + base64.b64encode(png(8, 8)).decode()
    with pytest.raises(InvalidRequest, match="takes no images: it has no 'vision' ability") as err:
        model.chat([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                 {"type": "image_url", "image_url": {"url": image}}]}])
    assert err.value.field == "messages[0].content[1]"


def test_stream_options_are_accepted(rq):
    chunks = list(rq.client.get_model("gg").generate(PROMPT, {"max_tokens": 5, "stream": True, **GREEDY,
                                                              "stream_options": {"include_usage": True}}))
    assert chunks[-1]["usage"]["completion_tokens"] == 5

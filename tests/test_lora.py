"""LoRA adapters on both engines: two PEFT adapters of the tiny Llama (random, init_lora_weights=False, seeds 1
and 2) and their GGUF LoRA twins, loaded at launch (peft_model_config) or at run time, chosen per request
(generate_config lora_name, the OpenAI model field), mixed in one batch. Served text is compared with PEFT's own
generate and with llama-cpp-python loading the adapter itself, in this process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import served_mesh
from zinfer.shared import keys
from zinfer.shared.errors import Conflict, InvalidRequest, NotFound

PROMPTS = ["Once upon a time", "The blue whale is", "Hello, how are you", "Numbers: 0 1 2"]
GREEDY = {"temperature": 0, "max_tokens": 12}


def peft_config(models, gguf: bool = False) -> dict:
    suffix = "_gguf" if gguf else ""
    return {"lora_list": [{"lora_name": "A", "local_path": str(models[f"lora_a{suffix}"])},
                          {"lora_name": "B", "local_path": str(models[f"lora_b{suffix}"])}]}


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_models):
    launches = [("hfl", dict(model_name="custom-llama-2", model_format="pytorch",
                             peft_model_config=peft_config(tiny_models))),
                ("ggl", dict(model_name="custom-llama-2", model_format="ggufv2", quantization="F32",
                             peft_model_config=peft_config(tiny_models, gguf=True)))]
    with served_mesh(tmp_path_factory, tiny_models, "lora", launches, gateway=True) as m:
        m.admin_api_key = keys.api_key_of(keys.read_key_file(m.admin_key))
        yield m


@pytest.fixture(scope="module")
def peft_out(tiny_models):
    """PEFT's own greedy text for each prompt: base, A, B."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["pytorch"])
    out: dict[str | None, dict[str, str]] = {}
    for name in (None, "A", "B"):
        model = AutoModelForCausalLM.from_pretrained(tiny_models["pytorch"], dtype=torch.float32)
        if name is not None:
            model = PeftModel.from_pretrained(model, tiny_models[f"lora_{name.lower()}"])
        model.eval()
        out[name] = {}
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt")
            with torch.inference_mode():
                gen = model.generate(**ids, max_new_tokens=GREEDY["max_tokens"], do_sample=False,
                                     pad_token_id=tok.eos_token_id)
            out[name][prompt] = tok.decode(gen[0][ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert out["A"] != out[None] and out["B"] != out[None] and out["A"] != out["B"]
    return out


def llama_greedy(llm, prompt: str, n: int = GREEDY["max_tokens"]) -> str:
    """The first n greedy tokens' text from llama-cpp-python's own generate (create_completion runs past
    max_tokens while a token's bytes do not decode), as create_completion tokenizes the prompt."""
    import llama_cpp

    vocab, tokens = llama_cpp.llama_model_get_vocab(llm.model), []
    for token in llm.generate(llm.tokenize(prompt.encode("utf-8"), special=True), temp=0.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(tokens) == n:
            break
        tokens.append(token)
    return llm.detokenize(tokens).decode("utf-8", errors="ignore")


@pytest.fixture(scope="module")
def llama_out(tiny_models):
    """llama-cpp-python's own greedy text, loading each GGUF LoRA itself (Llama(lora_path=...))."""
    from llama_cpp import Llama

    out: dict[str | None, dict[str, str]] = {}
    for name in (None, "A", "B"):
        path = str(tiny_models[f"lora_{name.lower()}_gguf"]) if name else None
        llm = Llama(model_path=str(tiny_models["gguf"]), n_ctx=2048, lora_path=path, verbose=False)
        out[name] = {p: llama_greedy(llm, p) for p in PROMPTS}
        llm.close()
    assert out["A"] != out[None] and out["B"] != out[None]
    return out


def served(m, uid: str, prompt: str, lora: str | None, **extra) -> str:
    cfg = {**GREEDY, **({"lora_name": lora} if lora else {}), **extra}
    return m.client.get_model(uid).generate(prompt, cfg)["choices"][0]["text"]


@pytest.mark.parametrize("lora", [None, "A", "B"])
def test_transformers_adapters_equal_peft(lm, peft_out, lora):
    for prompt in PROMPTS:
        assert served(lm, "hfl", prompt, lora) == peft_out[lora][prompt], (lora, prompt)


@pytest.mark.parametrize("lora", [None, "A", "B"])
def test_llama_cpp_adapters_equal_llama_cpp_python(lm, llama_out, lora):
    for prompt in PROMPTS:
        assert served(lm, "ggl", prompt, lora) == llama_out[lora][prompt], (lora, prompt)


@pytest.mark.parametrize("uid", ["hfl", "ggl"])
def test_mixed_concurrent_requests_each_get_their_own_adapter(lm, peft_out, llama_out, uid):
    expected = peft_out if uid == "hfl" else llama_out
    jobs = [(PROMPTS[i % len(PROMPTS)], (None, "A", "B")[i % 3]) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda job: served(lm, uid, *job), jobs))
    for (prompt, lora), text in zip(jobs, texts, strict=True):
        assert text == expected[lora][prompt], (prompt, lora)


def test_unknown_adapter_and_bad_scale_are_refused_by_name(lm):
    with pytest.raises(InvalidRequest) as err:
        served(lm, "hfl", "hello", "C")
    assert err.value.field == "lora_name" and "A, B" in str(err.value)
    with pytest.raises(InvalidRequest) as err:
        served(lm, "ggl", "hello", "A", lora_scale=7)
    assert err.value.field == "lora_scale"
    with pytest.raises(InvalidRequest) as err:
        served(lm, "hfl", "hello", "A", lora_scale=0.5)  # PEFT's batch has no per-request strength
    assert err.value.field == "lora_scale"
    with pytest.raises(InvalidRequest) as err:
        served(lm, "ggl", "hello", None, lora_scale=0.5)
    assert err.value.field == "lora_scale"
    assert served(lm, "hfl", PROMPTS[0], None) == served(lm, "hfl", PROMPTS[0], None)  # still serving


def test_llama_cpp_scale_per_request(lm, tiny_models):
    from llama_cpp import Llama

    llm = Llama(model_path=str(tiny_models["gguf"]), n_ctx=2048, lora_path=str(tiny_models["lora_a_gguf"]),
                lora_scale=0.5, verbose=False)
    expected = llama_greedy(llm, PROMPTS[0])
    llm.close()
    assert served(lm, "ggl", PROMPTS[0], "A", lora_scale=0.5) == expected


@pytest.mark.parametrize("uid", ["hfl", "ggl"])
def test_run_time_load_then_unload(lm, tiny_models, peft_out, llama_out, uid):
    c = lm.client
    path = tiny_models["lora_b_gguf" if uid == "ggl" else "lora_b"]
    expected = (peft_out if uid == "hfl" else llama_out)["B"][PROMPTS[1]]
    c.load_lora(uid, "B2", str(path))
    assert served(lm, uid, PROMPTS[1], "B2") == expected
    assert "B2" in [x["lora_name"] for x in c.list_loras(uid)]
    with pytest.raises(Conflict):
        c.load_lora(uid, "B2", str(path))
    c.unload_lora(uid, "B2")
    with pytest.raises(InvalidRequest) as err:
        served(lm, uid, PROMPTS[1], "B2")
    assert err.value.field == "lora_name"
    with pytest.raises(NotFound):
        c.unload_lora(uid, "B2")
    assert [x["lora_name"] for x in c.list_loras(uid)] == ["A", "B"]

"""LoRA adapters on both engines: two PEFT adapters of the tiny Llama (random, init_lora_weights=False, seeds 1
and 2) and their GGUF LoRA twins, loaded at launch (peft_model_config) or at run time, chosen per request
(generate_config lora_name, the OpenAI model field), mixed in one batch. Served text is compared with PEFT's own
generate and with llama-cpp-python loading the adapter itself, in this process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import served_mesh
from zinfer.shared.errors import Conflict, InvalidRequest, NotFound

PROMPTS = ["Once upon a time", "The blue whale is", "Hello, how are you", "Numbers: 0 1 2"]
GREEDY = {"temperature": 0, "max_tokens": 12}


def peft_config(models, gguf: bool = False) -> dict:
    """Adapters A and B (PEFT) for hfl; their GGUF twins, named gA and gB, for ggl."""
    suffix, prefix = ("_gguf", "g") if gguf else ("", "")
    return {"lora_list": [{"lora_name": f"{prefix}A", "local_path": str(models[f"lora_a{suffix}"])},
                          {"lora_name": f"{prefix}B", "local_path": str(models[f"lora_b{suffix}"])}]}


def names(uid: str) -> list[str]:
    return ["gA", "gB"] if uid == "ggl" else ["A", "B"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory, tiny_models):
    launches = [("hfl", dict(model_name="custom-llama-2", model_format="pytorch",
                             peft_model_config=peft_config(tiny_models))),
                ("ggl", dict(model_name="custom-llama-2", model_format="ggufv2", quantization="F32",
                             peft_model_config=peft_config(tiny_models, gguf=True)))]
    with served_mesh(tmp_path_factory, tiny_models, "lora", launches, gateway=True) as m:
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
    if uid == "ggl" and lora in ("A", "B"):
        lora = "g" + lora
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
    assert err.value.field == "lora_name" and "(loaded: A, B)" in str(err.value)
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
    assert [x["lora_name"] for x in c.list_loras(uid)] == names(uid)


def test_unloading_an_adapter_ends_the_requests_that_use_it_with_a_typed_error(lm, tiny_models, peft_out):
    c = lm.client
    c.load_lora("hfl", "gone", str(tiny_models["lora_a"]))
    stream = c.get_model("hfl").generate("hello", {"max_tokens": 1900, "temperature": 0, "ignore_eos": True,
                                                   "stream": True, "stream_interval_ms": 0, "lora_name": "gone"})
    next(stream)  # running: 1,900 tokens take seconds
    c.unload_lora("hfl", "gone")
    with pytest.raises(InvalidRequest) as err:
        for _ in stream:
            pass
    assert err.value.field == "lora_name" and "unloaded" in str(err.value)
    assert served(lm, "hfl", PROMPTS[0], "A") == peft_out["A"][PROMPTS[0]]


# ---------------------------------------------------------------- through the gateway, the CLI, xinference-client


def test_openai_model_field_names_an_adapter(lm, tiny_models, peft_out, llama_out):
    import openai
    import requests

    from tests.test_gateway import oai

    client = oai(lm)
    assert client.completions.create(model="A", prompt=PROMPTS[0], **GREEDY).choices[0].text \
        == peft_out["A"][PROMPTS[0]]
    assert client.completions.create(model="hfl:B", prompt=PROMPTS[0], **GREEDY).choices[0].text \
        == peft_out["B"][PROMPTS[0]]
    for uid in ("hfl", "ggl"):  # one name, two models: the model field must say which
        lm.client.load_lora(uid, "dup", str(tiny_models["lora_a_gguf" if uid == "ggl" else "lora_a"]))
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="dup", prompt=PROMPTS[0], **GREEDY)
    assert "UID:dup" in str(err.value)
    assert client.completions.create(model="ggl:dup", prompt=PROMPTS[0], **GREEDY).choices[0].text \
        == served(lm, "ggl", PROMPTS[0], "A")
    for uid in ("hfl", "ggl"):
        lm.client.unload_lora(uid, "dup")
    headers = {"Authorization": f"Bearer {lm.admin_api_key}"}
    reply = requests.post(f"{lm.gateway_url}/v1/load_lora_adapter", headers=headers, timeout=60,
                          json={"model": "hfl", "lora_name": "only", "lora_path": str(tiny_models["lora_b"])})
    assert reply.status_code == 200, reply.text
    out = client.chat.completions.create(model="only", messages=[{"role": "user", "content": "hi"}], **GREEDY)
    expected = lm.client.get_model("hfl").chat([{"role": "user", "content": "hi"}], {**GREEDY, "lora_name": "B"})
    assert out.choices[0].message.content == expected["choices"][0]["message"]["content"]
    listed = {m.id: m for m in client.models.list().data}
    assert listed["only"].parent == "hfl" and listed["A"].parent == "hfl" and listed["gA"].parent == "ggl"
    assert listed["only"].root == str(tiny_models["lora_b"])
    reply = requests.post(f"{lm.gateway_url}/v1/unload_lora_adapter", headers=headers, timeout=60,
                          json={"lora_name": "only"})
    assert reply.status_code == 200, reply.text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="hfl:only", prompt=PROMPTS[0], **GREEDY)
    assert "loaded: A, B" in str(err.value)


def test_cli_lora_modules_and_lora_commands(lm, tiny_models, peft_out):
    from tests.test_dropin import ok, refused

    ok(lm, "launch", "-n", "custom-llama-2", "-f", "pytorch", "-u", "clil", "--lora-modules", "A",
       str(tiny_models["lora_a"]), "-lm", "B", str(tiny_models["lora_b"]))
    try:
        assert "+ LoRA A, B" in ok(lm, "list").replace("\n", "")
        assert served(lm, "clil", PROMPTS[2], "B") == peft_out["B"][PROMPTS[2]]
        ok(lm, "lora", "unload", "clil", "A")
        assert "B" in ok(lm, "lora", "list", "clil") and '"A"' not in ok(lm, "lora", "list", "clil", "--json")
        assert "lora_name" in refused(lm, "lora", "unload", "clil", "A")
        ok(lm, "lora", "load", "clil", "A", str(tiny_models["lora_a"]))
        assert served(lm, "clil", PROMPTS[2], "A") == peft_out["A"][PROMPTS[2]]
    finally:
        ok(lm, "terminate", "-u", "clil")


def test_xinference_client_peft_model_config(lm, tiny_models, peft_out):
    from xinference_client import RESTfulClient

    client = RESTfulClient(lm.gateway_url, api_key=lm.admin_api_key)
    uid = client.launch_model(model_name="custom-llama-2", model_format="pytorch", model_uid="xl",
                              peft_model_config={"lora_list": [{"lora_name": "A",
                                                                 "local_path": str(tiny_models["lora_a"])}]})
    try:
        out = client.get_model(uid).generate(PROMPTS[3], generate_config={**GREEDY, "lora_name": "A"})
        assert out["choices"][0]["text"] == peft_out["A"][PROMPTS[3]]
    finally:
        client.terminate_model(uid)


def test_a_restarted_instance_keeps_adapters_loaded_at_run_time(lm, tiny_models, peft_out):
    import os
    import signal

    c = lm.client
    c.load_lora("hfl", "R", str(tiny_models["lora_b"]))
    try:
        view = lm.wait(lambda: (v := c.describe_model("hfl"))["state"] == "ready"
                       and "R" in [x["lora_name"] for x in v["loras"]] and v)
        os.kill(view["pids"][0], signal.SIGKILL)
        lm.wait(lambda: (v := c.describe_model("hfl"))["restarts"] > view["restarts"] and v["state"] == "ready",
                timeout=120)
        assert served(lm, "hfl", PROMPTS[0], "R") == peft_out["B"][PROMPTS[0]]
        assert served(lm, "hfl", PROMPTS[0], "A") == peft_out["A"][PROMPTS[0]]
    finally:
        c.unload_lora("hfl", "R")


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory, tiny_models):
    """An adapter of a Llama with another hidden size, and corrupt copies of A (PEFT and GGUF)."""
    import shutil

    from zinfer.shared.tinymodels import build_lora_adapter, build_tiny_llama

    root = tmp_path_factory.mktemp("bad-loras")
    other = build_lora_adapter(build_tiny_llama(root / "wide-llama", hidden=96, heads=4, kv_heads=2),
                               root / "wide-adapter", seed=3)
    corrupt = root / "corrupt"
    shutil.copytree(tiny_models["lora_a"], corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    corrupt_gguf = root / "corrupt.gguf"
    corrupt_gguf.write_bytes(tiny_models["lora_a_gguf"].read_bytes()[:2000])
    return {"other": other, "corrupt": corrupt, "corrupt_gguf": corrupt_gguf}


@pytest.mark.parametrize("case", ["missing", "other", "kind"])
def test_a_launch_with_a_bad_adapter_is_refused_and_nothing_launches(lm, tiny_models, bad_adapters, case):
    path = {"missing": "/nonexistent/adapter", "other": str(bad_adapters["other"]),
            "kind": str(tiny_models["lora_a_gguf"])}[case]
    with pytest.raises((InvalidRequest, NotFound)) as err:
        lm.client.launch_model(model_name="custom-llama-2", model_format="pytorch", model_uid=f"bad-{case}",
                               peft_model_config={"lora_list": [{"lora_name": "X", "local_path": path}]})
    assert err.value.field == "peft_model_config" and "'X'" in str(err.value)
    assert f"bad-{case}" not in lm.client.list_models()


@pytest.mark.parametrize(("uid", "case"), [("hfl", "corrupt"), ("hfl", "other"), ("ggl", "corrupt_gguf"),
                                           ("ggl", "corrupt")])
def test_a_bad_run_time_adapter_is_refused_and_the_others_keep_serving(lm, bad_adapters, peft_out, llama_out,
                                                                        uid, case):
    with pytest.raises(InvalidRequest) as err:
        lm.client.load_lora(uid, "X", str(bad_adapters[case]))
    assert err.value.field == "lora_path" and "'X'" in str(err.value)
    expected = (peft_out if uid == "hfl" else llama_out)["A"][PROMPTS[0]]
    assert served(lm, uid, PROMPTS[0], "A") == expected
    assert [x["lora_name"] for x in lm.client.list_loras(uid)] == names(uid)

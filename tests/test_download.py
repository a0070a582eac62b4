"""Specs without model_uri (issue 14): the worker downloads model_id through huggingface_hub, into the standard
Hugging Face cache, with progress, stopped by a terminate; cached files launch offline.

A stand-in for the Hub on 127.0.0.1 (tests/hubserver.py) serves the tiny models in the Hub's routes; the workers
get HF_ENDPOINT pointed at it, an empty HF_HOME and an HF_TOKEN. Outputs are compared with the same models
launched from their local folders.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import embedding_definition, llm_definition
from tests.hubserver import HubServer
from tests.mesh import REPO, Mesh
from zinfer.shared.errors import NotFound
from zinfer.shared.tinymodels import SPLIT_PARTS, SPLIT_TEMPLATE

PROMPT = "What is the largest animal in the world?"
TOKEN = "hf_zinfer_test_token"


def _hub_only(definition: dict) -> dict:
    """The definition with its model_uri removed: its files come from model_id."""
    for spec in definition.get("model_specs", [definition]):
        spec.pop("model_uri", None)
    return definition


@pytest.fixture
def hub_mesh(tmp_path, tiny_models):
    # A larger repository for the cancel test: the tiny Llama and a 4 MiB file (downloads go by 1 MiB blocks).
    large = tmp_path / "large-repo"
    shutil.copytree(tiny_models["pytorch"], large)
    (large / "extra.bin").write_bytes(bytes(4 << 20))
    repos = {"zinfer/tiny-llama": tiny_models["pytorch"], "zinfer/tiny-llama-gguf": tiny_models["gguf_dir"],
             "sentence-transformers/all-MiniLM-L6-v2": tiny_models["embedding"], "zinfer/tiny-llama-large": large,
             "zinfer/tiny-lora-a": tiny_models["lora_a"], "zinfer/tiny-llava-gguf": tiny_models["llava_gguf_dir"]}
    # A second, Hub-compatible server that registrations name as model_hub "company" (the hub_endpoints setting):
    # the tiny Llama's GGUF in three parts.
    with HubServer(repos) as hub, HubServer({"acme/tiny-split": tiny_models["gguf_split_dir"]}) as company:
        m = Mesh(tmp_path / "home", tmp_path)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            m.env.pop(name, None)
        m.env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_TOKEN=TOKEN,
                     HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5",
                     ZINFER_HUB_ENDPOINTS=f"company={company.url}")
        m.company = company
        try:
            m.start_all()
            c = m.client
            c.register_model("LLM", llm_definition(tiny_models, "local-llama"))
            c.register_model("embedding", embedding_definition(tiny_models, "local-minilm"))
            c.register_model("LLM", _hub_only(llm_definition(tiny_models, "hub-llama")))
            c.register_model("embedding", _hub_only(embedding_definition(tiny_models, "hub-minilm")))
            large_definition = _hub_only(llm_definition(tiny_models, "hub-llama-large"))
            large_definition["model_specs"][0]["model_id"] = "zinfer/tiny-llama-large"
            c.register_model("LLM", large_definition)
            m.hub = hub
            m.hf_cache = tmp_path / "hf" / "hub"
            yield m
        finally:
            m.stop()


def _greedy(mesh, uid: str) -> str:
    out = mesh.client.get_model(uid).generate(PROMPT, {"max_tokens": 16, "temperature": 0, "ignore_eos": True})
    return out["choices"][0]["text"]


def _vector(mesh, uid: str) -> np.ndarray:
    return np.array(mesh.client.get_model(uid).create_embedding("the blue whale")["data"][0]["embedding"])


def _launch_watching(mesh, **launch) -> list[str]:
    """Launch without waiting and collect the stages the instance reports until it is ready."""
    c = mesh.client
    uid = c.launch_model(wait=False, **launch)
    stages, deadline = [], time.monotonic() + 120
    while True:
        view = c.describe_model(uid)
        if view.get("stage") and view["stage"] not in stages:
            stages.append(view["stage"])
        if view["state"] in ("ready", "failed"):
            assert view["state"] == "ready", view
            return stages
        assert time.monotonic() < deadline, stages
        time.sleep(0.02)


def test_model_id_launches_download_with_progress_then_run_offline(hub_mesh):
    m, c = hub_mesh, hub_mesh.client
    m.hub.bytes_per_s = 2 << 20  # a link slow enough that the progress shows (2 MiB/s)
    stages = _launch_watching(m, model_name="hub-llama", model_format="pytorch", model_uid="hub-pt")
    downloading = [s for s in stages if s.startswith("downloading zinfer/tiny-llama:")]
    assert downloading and downloading[-1].endswith(" MiB") and " of " in downloading[-1], stages
    m.hub.bytes_per_s = None
    c.launch_model(model_name="hub-llama", model_format="ggufv2", quantization="F32", model_uid="hub-gguf")
    c.launch_model(model_name="hub-minilm", model_type="embedding", model_uid="hub-emb")
    # Into the standard cache, and for the GGUF spec the one file of its template only.
    assert (m.hf_cache / "models--zinfer--tiny-llama" / "snapshots").is_dir()
    gguf_files = {path.rsplit("/", 1)[-1] for _, path, _ in m.hub.served("/zinfer/tiny-llama-gguf/resolve/")}
    assert gguf_files == {"tiny-llama.F32.gguf"}
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in m.hub.served("/zinfer/")), "HF_TOKEN not sent"
    # The same answers as from the local folders.
    c.launch_model(model_name="local-llama", model_format="pytorch", model_uid="local-pt")
    c.launch_model(model_name="local-llama", model_format="ggufv2", quantization="F32", model_uid="local-gguf")
    c.launch_model(model_name="local-minilm", model_type="embedding", model_uid="local-emb")
    assert _greedy(m, "hub-pt") == _greedy(m, "local-pt")
    assert _greedy(m, "hub-gguf") == _greedy(m, "local-gguf")
    assert np.allclose(_vector(m, "hub-emb"), _vector(m, "local-emb"), atol=1e-6)
    # Another hub (model_hub "company", its endpoint in hub_endpoints): a split GGUF, every part downloaded.
    c.register_model("LLM", {
        "version": 2, "model_name": "company-split", "model_lang": ["en"], "model_ability": ["generate"],
        "context_length": 2048, "model_specs": [{
            "model_format": "ggufv2", "model_size_in_billions": 1, "quantization": "F32", "model_hub": "company",
            "model_id": "acme/tiny-split", "model_file_name_template": "tiny-llama.{quantization}.gguf",
            "model_file_name_split_template": SPLIT_TEMPLATE,
            "quantization_parts": {"F32": [f"0000{i}-of-00003" for i in (1, 2, 3)]}}]})
    c.launch_model(model_name="company-split", model_uid="company-split")
    assert _greedy(m, "company-split") == _greedy(m, "local-gguf")
    parts = {path.rsplit("/", 1)[-1] for method, path, _ in m.company.served("/acme/tiny-split/resolve/")
             if method == "GET"}
    assert parts == set(SPLIT_PARTS) and not m.hub.served("/acme/")
    c.terminate_model("company-split")
    # A repository the Hub does not have: NotFound naming model_id.
    bad = _hub_only(llm_definition({"pytorch": "/x", "gguf_dir": "/x"}, "no-such-repo"))
    bad["model_specs"][0]["model_id"] = "zinfer/no-such-repo"
    c.register_model("LLM", bad)
    with pytest.raises(NotFound) as err:
        c.launch_model(model_name="no-such-repo", model_format="pytorch", model_uid="missing")
    assert err.value.field == "model_id" and "zinfer/no-such-repo" in str(err.value)
    # The Hub gone: the cached files launch offline.
    answers = {uid: _greedy(m, uid) for uid in ("hub-pt", "hub-gguf")}
    vector = _vector(m, "hub-emb")
    m.hub.stop()
    for uid in ("hub-pt", "hub-gguf", "hub-emb"):
        c.terminate_model(uid)
    c.launch_model(model_name="hub-llama", model_format="pytorch", model_uid="hub-pt")
    c.launch_model(model_name="hub-llama", model_format="ggufv2", quantization="F32", model_uid="hub-gguf")
    c.launch_model(model_name="hub-minilm", model_type="embedding", model_uid="hub-emb")
    assert {uid: _greedy(m, uid) for uid in answers} == answers
    assert np.allclose(_vector(m, "hub-emb"), vector, atol=1e-6)


def test_a_lora_adapter_named_by_hub_id_is_downloaded_at_load(hub_mesh, tiny_models):
    c = hub_mesh.client
    local = {"lora_list": [{"lora_name": "A", "local_path": str(tiny_models["lora_a"])}]}
    hub = {"lora_list": [{"lora_name": "A", "local_path": "zinfer/tiny-lora-a"}]}
    c.launch_model(model_name="local-llama", model_format="pytorch", model_uid="lora-local", peft_model_config=local)
    c.launch_model(model_name="local-llama", model_format="pytorch", model_uid="lora-hub", peft_model_config=hub)
    try:
        assert hub_mesh.hub.served("adapter_model.safetensors")
        cfg = {"max_tokens": 16, "temperature": 0, "ignore_eos": True, "lora_name": "A"}
        texts = [c.get_model(uid).generate(PROMPT, cfg)["choices"][0]["text"] for uid in ("lora-local", "lora-hub")]
        assert texts[0] == texts[1] != _greedy(hub_mesh, "lora-local")
    finally:
        c.terminate_model("lora-local")
        c.terminate_model("lora-hub")


def test_a_gguf_vision_models_projector_is_downloaded_with_it(hub_mesh):
    """A ggufv2 spec by model_id with multimodal_projectors: the launch downloads the model file and the mmproj
    file the launch takes (the spec's first), and the model then sees images."""
    from tests.test_vision import asking, gguf_vision_definition
    from zinfer.shared.tinyvision import MMPROJ, png

    c = hub_mesh.client
    definition = _hub_only(gguf_vision_definition("/unused"))
    definition["model_specs"][0]["model_id"] = "zinfer/tiny-llava-gguf"
    c.register_model("LLM", definition)
    c.launch_model(model_name="my-llava-gguf", model_format="ggufv2", quantization="F32", model_uid="hub-llava")
    try:
        assert hub_mesh.hub.served(MMPROJ) and hub_mesh.hub.served("tiny-llava.F32.gguf")
        image, plain = asking("What is it?", png(32, 32, seed=1)), [{"role": "user", "content": "What is it?"}]
        cfg = {"max_tokens": 4, "temperature": 0}
        usage = [c.get_model("hub-llava").chat(messages=m, generate_config=cfg)["usage"] for m in (image, plain)]
        assert usage[0]["prompt_tokens"] == usage[1]["prompt_tokens"] + 16  # the image's tokens
    finally:
        c.terminate_model("hub-llava")


def test_terminate_stops_a_download(hub_mesh):
    m, c = hub_mesh, hub_mesh.client
    m.hub.bytes_per_s = 512 << 10  # 512 KiB/s: the 4 MiB file would take 8 s
    uid = c.launch_model(model_name="hub-llama-large", model_format="pytorch", model_uid="slow", wait=False)
    deadline = time.monotonic() + 60
    while not c.describe_model(uid).get("stage", "").startswith("downloading"):
        assert time.monotonic() < deadline, c.describe_model(uid)
        time.sleep(0.02)
    listed = subprocess.run([sys.executable, "-m", "zinfer", "list"], capture_output=True, text=True, timeout=60,
                            cwd=REPO, env={**m.env, "PYTHONPATH": str(REPO), "COLUMNS": "300"})
    assert "launching (downloading zinfer/tiny-llama-large: " in listed.stdout, listed.stdout + listed.stderr
    c.terminate_model(uid)
    with pytest.raises(NotFound):
        c.describe_model(uid)
    # The download stops: the worker breaks the connection off within a block (the Hub sees it as it writes).
    deadline = time.monotonic() + 30
    while "extra.bin" not in m.hub.aborted:
        assert time.monotonic() < deadline, "the download went on after terminate"
        time.sleep(0.05)
    assert len([r for r in m.hub.served("/extra.bin") if r[0] == "GET"]) == 1  # and is not retried
    # The worker is free to launch it again (at full speed now), and it resumes into the same cache.
    m.hub.bytes_per_s = None
    c.launch_model(model_name="hub-llama-large", model_format="pytorch", model_uid="slow")
    assert _greedy(m, "slow")


def test_register_from_hub_reads_only_small_files_and_fills_what_from_path_fills(tmp_path, tiny_models):
    """`zinfer register --from-hub ID --dry-run`: the repository's config, tokenizer and template files and its
    safetensors header (a byte range), never the weights; the same fields as --from-path on the same folder, the
    place being the repository."""
    import json

    from zinfer.shared.fromfiles import registration_from_path

    folder = tiny_models["tools_pytorch"]
    with HubServer({"zinfer/tool-llama": folder}) as hub:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1")
        run = [sys.executable, "-m", "zinfer", "register", "--dry-run", "--from-hub"]
        out = subprocess.run([*run, "zinfer/tool-llama"], capture_output=True, text=True, cwd=REPO, env=env,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        missing = subprocess.run([*run, "zinfer/no-such-repo"], capture_output=True, text=True, cwd=REPO, env=env,
                                 timeout=120)
        header_reads = hub.served("model.safetensors")
    assert missing.returncode != 0 and "model_id" in missing.stderr and "no such repository" in missing.stderr
    got = json.loads(out.stdout)
    _, want = registration_from_path(str(folder), name="tool-llama")
    place = want["model_specs"][0].pop("model_uri")
    assert place == f"file://{folder}"
    spec = got["model_specs"][0]
    assert spec.pop("model_id") == "zinfer/tool-llama" and spec.pop("model_hub") == "huggingface"
    spec.pop("model_revision")
    assert got == want  # abilities, reasoning tags, context length, size from the header, stop ids
    downloaded = {p.name for p in (tmp_path / "hf").rglob("*") if p.is_file() and "snapshots" in p.parts}
    assert "config.json" in downloaded and "tokenizer.json" in downloaded and "model.safetensors" not in downloaded
    assert header_reads  # the size came from the header on the Hub (by range: the weights are not in the cache)

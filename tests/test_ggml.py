"""ggmlv3 specs (issue 14): GGML v3 files converted to GGUF once, at launch, then served by llama.cpp.

The tiny Llama is written as GGJT v3 files by test tooling (shared/tinyggml.py, as 2023's llama.cpp wrote them)
and, with the same weights and vocabulary, directly as GGUF: the converted file must hold the same tensors byte
for byte, and a launch of the seeds' ggmlv3 spec must answer as the GGUF spec does.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mesh import REPO
from zinfer.services.worker.instance import ggml
from zinfer.shared.errors import InvalidRequest
from zinfer.shared.tinyggml import GGML_TEMPLATE, SPM_GGUF_TEMPLATE

PROMPT = "What is the largest animal in the world?"

# The seeds' custom-llama-2 definition (Xinference's "Custom Models" page, first version), as written there.
SEED_DEFINITION = """
{
  "version": 1,
  "context_length": 2048,
  "model_name": "custom-llama-2",
  "model_lang": ["en"],
  "model_ability": ["generate"],
  "model_specs": [
    {
      "model_format": "pytorch",
      "model_size_in_billions": 7,
      "quantizations": ["4-bit", "8-bit", "none"],
      "model_id": "meta-llama/Llama-2-7b",
      "model_uri": "file:///path/to/llama-2-7b"
    },
    {
      "model_format": "ggmlv3",
      "model_size_in_billions": 7,
      "quantizations": ["q4_0", "q8_0"],
      "model_id": "TheBloke/Llama-2-7B-GGML",
      "model_file_name_template": "llama-2-7b.ggmlv3.{quantization}.bin"
    }
  ]
}
"""
SEED = REPO.parent / "shared" / "seeds" / "000_e1567be90eb6cb53.txt"


def test_the_definition_here_is_the_seeds():
    if not SEED.exists():
        pytest.skip(f"{SEED} is not beside this checkout")
    text = SEED.read_text()
    block = text[text.index("{"):text.index("* model_name")]
    assert json.loads(block) == json.loads(SEED_DEFINITION)


def _gguf_fields(path: Path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: (int(t.tensor_type), [int(d) for d in t.shape], bytes(t.data)) for t in reader.tensors}
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("GGUF.", "general."))}
    return tensors, fields


@pytest.mark.parametrize("quantization", ["q4_0", "q8_0"])
def test_the_converted_file_is_the_gguf_of_the_same_weights(tiny_models, tmp_path, quantization):
    src = tiny_models["ggml_dir"] / GGML_TEMPLATE.format(quantization=quantization)
    out = ggml.convert(src, tmp_path / "out.gguf", context_length=2048)
    got, want = _gguf_fields(out), _gguf_fields(tiny_models["spm_gguf_dir"] /
                                                 SPM_GGUF_TEMPLATE.format(quantization=quantization))
    assert got[0].keys() == want[0].keys() and got[0] == want[0]  # every tensor: type, shape, bytes
    assert got[1] == want[1]  # hyperparameters (the KV head count read from the shapes) and the vocabulary
    assert got[1]["llama.attention.head_count_kv"] == 2 and got[1]["tokenizer.ggml.model"] == "llama"
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left


def _corrupt(src: Path, dst: Path, at: int, data: bytes) -> Path:
    raw = bytearray(src.read_bytes())
    raw[at:at + len(data)] = data
    dst.write_bytes(bytes(raw))
    return dst


def test_files_that_do_not_convert_are_refused_with_the_reason(tiny_models, tmp_path):
    src = tiny_models["ggml_dir"] / GGML_TEMPLATE.format(quantization="q8_0")
    header = ggml.read_header(src)
    first = header.tensors[0]
    cases = {
        "truncated": (src.read_bytes()[:first.offset + 10], "ends inside tensor 'tok_embeddings.weight'"),
        "gguf": (b"GGUF" + b"\0" * 60, "is already GGUF"),
        "v2": (src.read_bytes()[:4] + struct.pack("<I", 2) + src.read_bytes()[8:], "GGJT version 2"),
        "foreign": (b"PK\x03\x04" + b"\0" * 60, "is not a GGML file"),
        "empty": (b"", "ends inside the header"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data)
        with pytest.raises(InvalidRequest, match=message) as err:
            ggml.convert(path, tmp_path / f"{name}.gguf", 2048)
        assert err.value.field in ("model_uri", "model_format") and not (tmp_path / f"{name}.gguf").exists()
    # A K-quant tensor (not a type GGUF shares with GGML v3 unchanged): refused, naming the tensor and its type.
    raw = src.read_bytes()
    start = raw.index(first.name.encode()) - 4 * len(first.dims) - 12  # n_dims, name length, type, dims, name
    k_quant = _corrupt(src, tmp_path / "kq.bin", start + 8, struct.pack("<I", 12))
    with pytest.raises(InvalidRequest, match="tensor 'tok_embeddings.weight' is Q4_K: only F32, F16"):
        ggml.convert(k_quant, tmp_path / "kq.gguf", 2048)
    # Two vocabulary entries reading the same (llama.cpp would abort the whole worker on such a vocabulary).
    offsets, at = [], 8 + 28
    for text, _ in header.vocab:
        offsets.append(at)
        at += 4 + len(text) + 4
    i = next(i for i in range(259, len(header.vocab) - 1)
             if len(header.vocab[i][0]) == len(header.vocab[i + 1][0]))
    dup = _corrupt(src, tmp_path / "dup.bin", offsets[i + 1] + 4, header.vocab[i][0])
    with pytest.raises(InvalidRequest, match=f"vocabulary entries {i} and {i + 1} both read"):
        ggml.convert(dup, tmp_path / "dup.gguf", 2048)


def test_a_cancelled_conversion_leaves_nothing(tiny_models, tmp_path):
    src = tiny_models["ggml_dir"] / GGML_TEMPLATE.format(quantization="q8_0")
    seen = []
    with pytest.raises(ggml.Cancelled):
        ggml.convert(src, tmp_path / "out.gguf", 2048, progress=lambda done, total: seen.append((done, total)),
                     cancelled=lambda: len(seen) >= 3)
    assert list(tmp_path.iterdir()) == [] and seen[-1][0] < seen[-1][1]
    # cached_gguf converts once; the second call opens the same file.
    first = ggml.cached_gguf(str(src), tmp_path / "cache", 2048)
    stat = first.stat()
    again = ggml.cached_gguf(str(src), tmp_path / "cache", 2048)
    assert again == first and again.stat().st_mtime_ns == stat.st_mtime_ns
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [first.name]


_QUANTIZED_IN_A_CHILD = """
import json, sys
import numpy as np
import llama_cpp.llama_cpp as low
from zinfer.services.worker.instance.backends.base import Sampling
from zinfer.services.worker.instance.backends.llama_cpp_backend import LlamaCppBackend

defaults = low.llama_model_default_params
backend = LlamaCppBackend(sys.argv[1], "cpu", 256, n_parallel=2)
greedy = Sampling(max_tokens=8, temperature=0, top_p=None, top_k=None, seed=None, stop_token_ids=(),
                  repetition_penalty=None, ignore_eos=True)
backend.add(0, backend.tokenize("the largest animal"), greedy)
backend.add(1, backend.tokenize("once upon a time"), greedy)
tokens = {0: [], 1: []}
while backend.active():
    for out in backend.step():
        tokens[out.seq_id].extend(out.tokens)
vectors, _ = backend.embed(["the largest animal"])
print(json.dumps({"amx": b"AMX_INT8 = 1" in low.llama_print_system_info(), "extra": backend.use_extra_bufts,
                  "tokens": [len(tokens[0]), len(tokens[1])], "finite": bool(np.isfinite(vectors).all()),
                  "restored": low.llama_model_default_params is defaults}))
"""


@pytest.mark.parametrize("quantization", ["q4_0", "q8_0"])
def test_quantized_models_generate_and_embed_where_llama_cpp_has_amx_kernels(tiny_models, quantization):
    """llama.cpp's AMX kernels segfaulted every quantized model on the Sapphire Rapids VMs this project runs on;
    the backend loads weights without them there (the llama_cpp_amx setting) and elsewhere as llama.cpp would.
    In a child process, so that a crash fails this test rather than the suite."""
    path = tiny_models["spm_gguf_dir"] / SPM_GGUF_TEMPLATE.format(quantization=quantization)
    run = subprocess.run([sys.executable, "-c", _QUANTIZED_IN_A_CHILD, str(path)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["extra"] == (not got["amx"]) and got["restored"]
    assert got["tokens"] == [8, 8] and got["finite"]


# ---------------------------------------------------------------- through the mesh


def _cli(mesh, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zinfer", *args], capture_output=True, text=True, cwd=cwd,
                          env={**mesh.env, "PYTHONPATH": str(REPO), "COLUMNS": "200"}, timeout=180)


def _greedy(mesh, uid: str, tokens: int = 24) -> str:
    out = mesh.client.get_model(uid).generate(PROMPT, {"max_tokens": tokens, "temperature": 0, "ignore_eos": True})
    return out["choices"][0]["text"]


def test_the_seeds_ggmlv3_spec_launches_and_answers_as_its_gguf(mesh, tiny_models, tmp_path):
    # The seed's files: llama-2-7b.ggmlv3.{q4_0,q8_0}.bin, here the tiny Llama's GGML v3 files under those names.
    folder = tmp_path / "ggml"
    folder.mkdir()
    for q in ("q4_0", "q8_0"):
        shutil.copy(tiny_models["ggml_dir"] / GGML_TEMPLATE.format(quantization=q),
                    folder / f"llama-2-7b.ggmlv3.{q}.bin")
    definition = json.loads(SEED_DEFINITION)  # its paths pointed at the tiny model's files
    definition["model_specs"][0]["model_uri"] = f"file://{tiny_models['pytorch']}"
    definition["model_specs"][1]["model_uri"] = f"file://{folder}"
    # The same weights as GGUF, for the comparison (a second registration, so the seed's stays as written).
    twin = json.loads(SEED_DEFINITION)
    twin["model_name"] = "custom-llama-2-gguf"
    twin["model_specs"] = [{"model_format": "ggufv2", "model_size_in_billions": 7, "quantizations": ["q4_0", "q8_0"],
                            "model_id": "zinfer/tiny-llama-spm", "model_file_name_template": SPM_GGUF_TEMPLATE,
                            "model_uri": f"file://{tiny_models['spm_gguf_dir']}"}]
    (tmp_path / "model.json").write_text(json.dumps(definition))
    assert _cli(mesh, "register", "--model-type", "LLM", "--file", "model.json", cwd=tmp_path).returncode == 0
    mesh.client.register_model("LLM", twin)
    cache = mesh.home / "cache" / "gguf-from-ggml"
    for q in ("q8_0", "q4_0"):
        out = _cli(mesh, "launch", "--model-name", "custom-llama-2", "--model-format", "ggmlv3", "-q", q, "-u",
                   f"ggml-{q}", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        view = mesh.client.describe_model(f"ggml-{q}")
        assert view["state"] == "ready" and view["model_format"] == "ggmlv3" and view["quantization"] == q
        mesh.client.launch_model(model_name="custom-llama-2-gguf", model_format="ggufv2", quantization=q,
                                 model_uid=f"gguf-{q}")
        assert _greedy(mesh, f"ggml-{q}") == _greedy(mesh, f"gguf-{q}")
    converted = sorted(p for p in cache.iterdir() if p.suffix == ".gguf")
    assert [p.name.split("-")[0] for p in converted] == ["llama"] * 2 and len(converted) == 2
    stamps = {p: p.stat().st_mtime_ns for p in converted}
    # A second launch of the same file reuses the converted GGUF (not written again).
    mesh.client.terminate_model("ggml-q8_0")
    mesh.client.launch_model(model_name="custom-llama-2", model_format="ggmlv3", quantization="q8_0",
                             model_uid="ggml-again")
    assert _greedy(mesh, "ggml-again") == _greedy(mesh, "gguf-q8_0")
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir() if p.suffix == ".gguf"} == stamps
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    assert os.access(converted[0], os.R_OK)

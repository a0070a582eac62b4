"""LoRA adapters' files checked against their model from headers alone (services/worker/adapters.py): what a
worker's probe and an instance's run-time load refuse, each naming the adapter and the field."""

from __future__ import annotations

import json
import shutil

import pytest

from zinfer.services.worker import adapters
from zinfer.shared import protocol as p
from zinfer.shared.errors import InvalidRequest, NotFound
from zinfer.shared.payloads import LoraAdapter


def lora(path) -> LoraAdapter:
    return LoraAdapter(lora_name="X", local_path=str(path))


def refused(path, model, fmt: str) -> str:
    with pytest.raises(InvalidRequest) as err:
        adapters.check(lora(path), str(path), str(model) if model else None, fmt, "peft_model_config")
    assert err.value.field == "peft_model_config" and "'X'" in str(err.value)
    return str(err.value)


def test_adapters_that_fit_pass_and_give_their_size(tiny_models):
    size = adapters.check(lora(tiny_models["lora_a"]), str(tiny_models["lora_a"]), str(tiny_models["pytorch"]),
                          "pytorch", "f")
    assert size == (tiny_models["lora_a"] / "adapter_model.safetensors").stat().st_size
    assert adapters.check(lora(tiny_models["lora_a_gguf"]), str(tiny_models["lora_a_gguf"]), str(tiny_models["gguf"]),
                          "ggufv2", "f") == tiny_models["lora_a_gguf"].stat().st_size


def test_each_engine_takes_its_own_kind(tiny_models):
    assert "PEFT folder" in refused(tiny_models["lora_a_gguf"], tiny_models["pytorch"], "pytorch")
    assert "GGUF LoRA file" in refused(tiny_models["lora_a"], tiny_models["gguf"], "ggufv2")


def test_an_adapter_of_another_size_or_rank_is_refused(tiny_models, tmp_path):
    from zinfer.shared.tinymodels import build_lora_adapter, build_tiny_llama, convert_lora_to_gguf

    wide = build_tiny_llama(tmp_path / "wide", hidden=96, heads=4, kv_heads=2)
    other = build_lora_adapter(wide, tmp_path / "wide-lora", seed=3)
    assert "another model size" in refused(other, tiny_models["pytorch"], "pytorch")
    assert "another model size" in refused(convert_lora_to_gguf(other, wide, tmp_path / "wide.gguf"),
                                           tiny_models["gguf"], "ggufv2")
    ranked = shutil.copytree(tiny_models["lora_a"], tmp_path / "ranked")
    config = json.loads((ranked / "adapter_config.json").read_text())
    (ranked / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    assert "r=4" in refused(ranked, tiny_models["pytorch"], "pytorch")
    (ranked / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    assert "IA3" in refused(ranked, tiny_models["pytorch"], "pytorch")


def test_an_adapter_of_another_architecture_is_refused(tiny_models, tmp_path):
    import gguf

    reader = gguf.GGUFReader(str(tiny_models["lora_a_gguf"]))
    w = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    for t in reader.tensors:
        w.add_tensor(t.name, t.data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "architecture 'qwen2'" in refused(tmp_path / "qwen.gguf", tiny_models["gguf"], "ggufv2")


def test_corrupt_files_are_refused(tiny_models, tmp_path):
    corrupt = shutil.copytree(tiny_models["lora_a"], tmp_path / "corrupt")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "not a readable safetensors file" in refused(corrupt, tiny_models["pytorch"], "pytorch")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_models["lora_a_gguf"].read_bytes()[:2000])
    assert "not a readable GGUF file" in refused(cut, tiny_models["gguf"], "ggufv2")
    assert "not a GGUF LoRA adapter" in refused(tiny_models["gguf"], tiny_models["gguf"], "ggufv2")


def test_where_an_adapter_is(tiny_models):
    assert adapters.local_path(lora(tiny_models["lora_a"]), "f") == str(tiny_models["lora_a"])
    assert adapters.local_path(lora("someone/their-adapter"), "f") is None  # a Hub id: downloaded at load
    with pytest.raises(NotFound) as err:
        adapters.local_path(lora("/no/such/adapter"), "lora_path")
    assert err.value.field == "lora_path"


def test_a_probe_adds_the_adapters_and_refuses_a_bad_one(tiny_models):
    spec_probe = p.FileProbe(ok=True, path=str(tiny_models["pytorch"]), memory=1000, host="h")
    from zinfer.shared.models import LLMSpec

    spec = LLMSpec(model_format="pytorch", model_size_in_billions=1, quantizations=["none"], model_id="x/y")
    msg = p.ProbeFiles(model_type="LLM", spec=spec, quantization="none", loras=[lora(tiny_models["lora_a"])])
    size = adapters.size_of(str(tiny_models["lora_a"]))
    assert adapters.probed(msg, spec_probe).memory == 1000 + 2 * size  # PEFT's weights and lora_mix's copy
    bad = p.ProbeFiles(model_type="LLM", spec=spec, quantization="none", loras=[lora("/no/such/adapter")])
    refusal = adapters.probed(bad, p.FileProbe(ok=True, path=str(tiny_models["pytorch"]), memory=1000, host="h"))
    assert not refusal.ok and refusal.field == "peft_model_config" and "'X'" in refusal.problem

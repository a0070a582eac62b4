"""Placement and spec matching as pure functions."""

import pytest

from services.scheduler.placement import Slot, estimate_memory, match_spec, place
from shared.errors import InvalidRequest, NotFound, TooLarge
from shared.models import EmbeddingFamily, LLMSpec, parse_llm

MiB = 2**20


def slots(**free_mib):
    return [Slot(worker_id=name.replace("_", ":"), device=name.replace("_", ":"), free=mb * MiB)
            for name, mb in free_mib.items()]


NEED = {"cpu": 100 * MiB, "cuda": 50 * MiB}


def test_most_free_device_wins():
    assert place(slots(cpu_0=300, cpu_1=500), NEED, 1, n_gpu=0) == ["cpu:1"]


def test_replicas_spread_over_distinct_devices_then_double_up():
    assert sorted(place(slots(cpu_0=300, cpu_1=300), NEED, 2, n_gpu=0)) == ["cpu:0", "cpu:1"]
    assert sorted(place(slots(cpu_0=300, cpu_1=100), NEED, 3, n_gpu=0)) == ["cpu:0", "cpu:0", "cpu:1"]


def test_gpus_first_when_auto_and_cpu_when_n_gpu_is_zero():
    s = slots(cpu=10_000, cuda_0=80, cuda_1=60)
    assert place(s, NEED, 1) == ["cuda:0"]
    assert place(s, NEED, 1, n_gpu=0) == ["cpu"]
    assert place(slots(cpu=10_000), NEED, 1) == ["cpu"]  # no GPU: the CPU


def test_gpu_idx_pins_and_names_missing_gpus():
    s = slots(cpu=10_000, cuda_0=800, cuda_1=60)
    assert place(s, NEED, 1, gpu_idx=[1]) == ["cuda:1"]
    with pytest.raises(InvalidRequest, match=r"gpu_idx \['cuda:3'\]"):
        place(s, NEED, 1, gpu_idx=[3])


def test_devices_pin_by_worker_name():
    assert place(slots(cpu_0=900, cpu_1=200), NEED, 1, devices=["cpu:1"]) == ["cpu:1"]
    with pytest.raises(InvalidRequest, match="cpu:7"):
        place(slots(cpu_0=900), NEED, 1, devices=["cpu:7"])


def test_nothing_fits_gives_the_numbers():
    with pytest.raises(TooLarge) as err:
        place(slots(cpu_0=60, cpu_1=90), NEED, 1, n_gpu=0)
    text = str(err.value)
    assert "cpu:0 needs 100 MiB, has 60 MiB free" in text and "cpu:1 needs 100 MiB, has 90 MiB free" in text
    with pytest.raises(TooLarge, match="1 of 2 replicas placed"):
        place(slots(cpu_0=150), NEED, 2, n_gpu=0)


def test_bad_n_gpu():
    with pytest.raises(InvalidRequest, match="n_gpu"):
        place(slots(cpu=100), NEED, 1, n_gpu="many")
    with pytest.raises(InvalidRequest, match="no GPU"):
        place(slots(cpu=100), NEED, 1, n_gpu=1)


FAMILY = parse_llm({
    "version": 1, "model_name": "m", "model_lang": ["en"], "model_ability": ["generate"],
    "model_specs": [
        {"model_format": "pytorch", "model_size_in_billions": 7, "quantizations": ["4-bit", "8-bit", "none"],
         "model_id": "a/b"},
        {"model_format": "ggufv2", "model_size_in_billions": "1_8", "quantizations": ["q4_0", "q8_0"],
         "model_id": "a/c", "model_file_name_template": "m.{quantization}.gguf"},
    ]})


def test_match_spec():
    spec, q = match_spec(FAMILY, None, None, None)
    assert spec.model_format == "pytorch" and q == "none"
    spec, q = match_spec(FAMILY, "ggufv2", 1.8, None)
    assert spec.model_size_in_billions == "1_8" and q == "q4_0"
    assert match_spec(FAMILY, None, None, "q8_0")[1] == "q8_0"
    with pytest.raises(NotFound) as err:
        match_spec(FAMILY, "ggufv2", None, "q5_k")
    assert "pytorch 7B [4-bit, 8-bit, none]" in str(err.value) and "ggufv2 1_8B [q4_0, q8_0]" in str(err.value)


def test_estimates_from_parameters_and_files(tmp_path):
    spec = LLMSpec(model_format="pytorch", model_size_in_billions=7, quantizations=["none"], model_id="a")
    assert estimate_memory(spec, "none", None, "cuda") == int(7e9 * 2 * 1.2)
    assert estimate_memory(spec, "4-bit", None, "cuda") < estimate_memory(spec, "8-bit", None, "cuda")
    f = tmp_path / "m.q4_0.gguf"
    f.write_bytes(b"x" * 1000)
    gguf = LLMSpec(model_format="ggufv2", model_size_in_billions=7, quantizations=["q4_0"],
                   model_uri=str(tmp_path), model_file_name_template="m.{quantization}.gguf")
    assert estimate_memory(gguf, "q4_0", None, "cpu") == 1200
    emb = EmbeddingFamily(model_name="e", dimensions=4, max_tokens=8, language=["en"], model_uri=str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    assert estimate_memory(None, None, emb, "cpu") == 2400  # both weight files count

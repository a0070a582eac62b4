"""Placement and spec matching as pure functions."""

import pytest
from msgspec.structs import replace as msgspec_replace

from zinfer.services.scheduler.placement import Slot, match_spec, place
from zinfer.services.worker import files
from zinfer.shared import protocol as p
from zinfer.shared.errors import InvalidRequest, NotFound, TooLarge
from zinfer.shared.models import EmbeddingFamily, LLMSpec, parse_llm
from zinfer.shared.sizing import estimate_memory

MiB = 2**20


NEED = {"cpu": 100 * MiB, "cuda": 50 * MiB}  # what one instance needs on a device of each kind


def slots(**free_mib):
    return [Slot(worker_id=name.replace("_", ":"), device=name.replace("_", ":"), free=mb * MiB,
                 need=NEED["cuda" if name.startswith("cuda") else "cpu"]) for name, mb in free_mib.items()]


def test_most_free_device_wins():
    assert place(slots(cpu_0=300, cpu_1=500), 1, n_gpu=0) == ["cpu:1"]


def test_replicas_spread_over_distinct_devices_then_double_up():
    assert sorted(place(slots(cpu_0=300, cpu_1=300), 2, n_gpu=0)) == ["cpu:0", "cpu:1"]
    assert sorted(place(slots(cpu_0=300, cpu_1=100), 3, n_gpu=0)) == ["cpu:0", "cpu:0", "cpu:1"]


def test_gpus_first_when_auto_and_cpu_when_n_gpu_is_zero():
    s = slots(cpu=10_000, cuda_0=80, cuda_1=60)
    assert place(s, 1) == ["cuda:0"]
    assert place(s, 1, n_gpu=0) == ["cpu"]
    assert place(slots(cpu=10_000), 1) == ["cpu"]  # no GPU: the CPU


def test_gpu_idx_pins_and_names_missing_gpus():
    s = slots(cpu=10_000, cuda_0=800, cuda_1=60)
    assert place(s, 1, gpu_idx=[1]) == ["cuda:1"]
    with pytest.raises(InvalidRequest, match=r"gpu_idx \['cuda:3'\]"):
        place(s, 1, gpu_idx=[3])


def test_devices_pin_by_worker_name():
    assert place(slots(cpu_0=900, cpu_1=200), 1, devices=["cpu:1"]) == ["cpu:1"]
    with pytest.raises(InvalidRequest, match="cpu:7"):
        place(slots(cpu_0=900), 1, devices=["cpu:7"])


def test_nothing_fits_gives_the_numbers():
    with pytest.raises(TooLarge) as err:
        place(slots(cpu_0=60, cpu_1=90), 1, n_gpu=0)
    text = str(err.value)
    assert "cpu:0 needs 100 MiB, has 60 MiB free" in text and "cpu:1 needs 100 MiB, has 90 MiB free" in text
    with pytest.raises(TooLarge, match="1 of 2 replicas placed"):
        place(slots(cpu_0=150), 2, n_gpu=0)


def test_bad_n_gpu():
    with pytest.raises(InvalidRequest, match="n_gpu"):
        place(slots(cpu=100), 1, n_gpu="many")
    with pytest.raises(InvalidRequest, match="no GPU"):
        place(slots(cpu=100), 1, n_gpu=1)


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
    assert estimate_memory(gguf, "q4_0", None, "cpu", str(f)) == 1200
    emb = EmbeddingFamily(model_name="e", dimensions=4, max_tokens=8, language=["en"], model_uri=str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    assert estimate_memory(None, None, emb, "cpu", str(tmp_path)) == 2400  # both weight files count
    assert files.probe(p.ProbeFiles(model_type="LLM", spec=gguf, quantization="q4_0"), "cpu").memory == 1200


def test_probe_names_missing_files_before_any_size(tmp_path):
    """A deleted folder is reported as missing files, not as a memory shortfall from the parameter count."""
    spec = LLMSpec(model_format="pytorch", model_size_in_billions=7, quantizations=["none"],
                   model_uri=str(tmp_path / "gone"))
    found = files.probe(p.ProbeFiles(model_type="LLM", spec=spec, quantization="none"), "cpu")
    assert not found.ok and found.code == "not_found" and found.field == "model_uri"
    assert str(tmp_path / "gone") in found.problem and "does not exist on host" in found.problem
    gguf = LLMSpec(model_format="ggufv2", model_size_in_billions=7, quantizations=["q4_0", "q8_0"],
                   model_uri=str(tmp_path), model_file_name_template="m.{quantization}.gguf")
    (tmp_path / "m.q4_0.gguf").write_bytes(b"x")
    found = files.probe(p.ProbeFiles(model_type="LLM", spec=gguf, quantization="q8_0"), "cpu")
    assert not found.ok and str(tmp_path / "m.q8_0.gguf") in found.problem and "q8_0" in found.problem


def test_a_single_file_uri_must_be_the_quantization_asked_for(tmp_path):
    """model_uri naming one file: -q F32 must not load the F16 file and list F32."""
    (tmp_path / "m.F16.gguf").write_bytes(b"x")
    spec = LLMSpec(model_format="ggufv2", model_size_in_billions=1, quantizations=["F16", "F32"],
                   model_uri=str(tmp_path / "m.F16.gguf"), model_file_name_template="m.{quantization}.gguf")
    assert files.local_llm_path(spec, "F16") == str(tmp_path / "m.F16.gguf")
    with pytest.raises(InvalidRequest, match="quantization 'F32'.*the F16 file") as err:
        files.local_llm_path(spec, "F32")
    assert err.value.field == "quantization"
    odd = msgspec_replace(spec, model_uri=str(tmp_path / "other.gguf"))
    (tmp_path / "other.gguf").write_bytes(b"x")
    with pytest.raises(InvalidRequest, match="quantization of what would load is unknown"):
        files.local_llm_path(odd, "F16")
    one = msgspec_replace(odd, quantizations=["F16"])
    assert files.local_llm_path(one, "F16") == str(tmp_path / "other.gguf")


def test_replicas_spread_over_hosts_before_devices():
    s = [Slot("a/cpu", "cpu", 900 * MiB, 100 * MiB, ("host-a", "10.0.0.2")),
         Slot("a/cpu:1", "cpu:1", 800 * MiB, 100 * MiB, ("host-a", "10.0.0.2")),
         Slot("b/cpu", "cpu", 300 * MiB, 100 * MiB, ("host-b", "10.0.0.3"))]
    assert place(s, 2, n_gpu=0) == ["a/cpu", "b/cpu"]  # host-b has less free memory, but is another host
    assert place(s, 3, n_gpu=0) == ["a/cpu", "b/cpu", "a/cpu:1"]
    assert place(s, 1, n_gpu=0, worker_ip=["10.0.0.3"]) == ["b/cpu"]
    assert place(s, 1, n_gpu=0, worker_ip=["host-a"]) == ["a/cpu"]


def test_a_host_without_the_files_is_passed_over_and_named_when_pinned():
    missing = NotFound("model_uri /m does not exist on host host-a", field="model_uri")
    s = [Slot("a/cpu", "cpu", 900 * MiB, 0, ("host-a", "10.0.0.2"), problem=missing),
         Slot("b/cpu", "cpu", 300 * MiB, 100 * MiB, ("host-b", "10.0.0.3"))]
    assert place(s, 1, n_gpu=0) == ["b/cpu"]
    with pytest.raises(NotFound, match="does not exist on host host-a") as err:
        place(s, 1, n_gpu=0, worker_ip=["host-a"])
    assert err.value.field == "model_uri"
    with pytest.raises(NotFound, match=r"host-a \(and on 1 other candidate worker\(s\)\)"):
        place([s[0], Slot("b/cpu", "cpu", 1, 0, ("host-b",), problem=missing)], 1, n_gpu=0)

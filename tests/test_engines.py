"""The engine registry (shared/engines.py): complete, consistent, and what placement and launches read."""

from __future__ import annotations

import typing

import msgspec
import pytest

from zinfer.shared import engines, models
from zinfer.shared import protocol as p
from zinfer.shared.errors import InvalidRequest
from zinfer.shared.models import ModelFormat

GENERIC = {"trust_remote_code", "request_limits", "continuous_batching"}  # options every engine reads


def test_every_engine_option_has_exactly_one_engine():
    owners: dict[str, list[str]] = {}
    for engine in engines.ENGINES:
        for name in engine.options:
            owners.setdefault(name, []).append(engine.name)
    fields = set(p.EngineOptions.__struct_fields__)
    assert set(owners) | GENERIC == fields and not set(owners) & GENERIC
    # one engine name each (sentence_transformers runs embedding and rerank models, with the same options), but
    # the batching options every embedding engine (and the audio one) reads
    batching = {"max_batch_size", "max_batch_tokens", "batch_wait_ms"}
    assert all(len(set(names)) == 1 for name, names in owners.items() if name not in batching), owners
    assert set(owners["max_batch_size"]) == {"sentence_transformers", "llama.cpp", "transformers"}


def test_every_format_and_type_has_an_engine_whose_loader_exists():
    for fmt in typing.get_args(ModelFormat):
        assert fmt in engines.for_model("LLM", fmt).formats
    assert engines.for_model("embedding", None).name == "sentence_transformers"
    assert engines.for_model("embedding", "ggufv2").loader.endswith("llama_embed_backend:load")
    assert engines.for_model("rerank", None).loader.endswith("cross_encoder_backend:load")
    assert {e.model_type for e in engines.ENGINES} == set(models.MODEL_TYPES)
    names = [(e.name, e.model_type) for e in engines.ENGINES]
    assert len(set(names)) == len(names)
    for engine in engines.ENGINES:
        assert callable(engines.loader(engine)), engine.loader
        for name, default in engine.options.items():  # each default passes the option's own bounds
            if default is not None:
                msgspec.convert({name: default}, p.EngineOptions)


def test_names_aliases_and_the_options_a_launch_may_give():
    assert engines.by_name(" LLAMA_CPP ") is engines.by_name("llama.cpp")
    assert engines.formats_of("llamacpp", "LLM") == ("ggufv2", "ggmlv3")
    assert engines.formats_of(None, "LLM") is None
    assert engines.formats_of("sentence-transformers", "embedding") == ("pytorch",)
    assert engines.by_name("sentence_transformers", "rerank").model_type == "rerank"
    assert engines.formats_of("sentence_transformers", "rerank") is None
    with pytest.raises(InvalidRequest, match="zinfer runs transformers or llama.cpp for LLM models") as err:
        engines.formats_of("vllm", "LLM")
    assert err.value.field == "model_engine"
    with pytest.raises(InvalidRequest, match="model_engine 'transformers'"):
        engines.formats_of("transformers", "embedding")
    transformers = engines.by_name("transformers")
    with pytest.raises(InvalidRequest, match="n_ctx is an option of the llama.cpp engine") as err:
        engines.check_options(p.EngineOptions(n_ctx=512), transformers)
    assert err.value.field == "n_ctx"
    with pytest.raises(InvalidRequest, match="continuous_batching") as err:
        engines.check_options(p.EngineOptions(continuous_batching=True), engines.by_name("sentence_transformers"))
    engines.check_options(p.EngineOptions(max_sequences=8, continuous_batching=False), transformers)
    assert engines.option(transformers, p.EngineOptions(), "max_sequences") == 64
    assert engines.option(transformers, p.EngineOptions(max_sequences=8), "max_sequences") == 8


def test_every_engine_has_a_memory_rule():
    from zinfer.shared import sizing

    assert {e.memory for e in engines.ENGINES} <= set(sizing.SIZERS)
    spec = msgspec.convert({"model_format": "ggufv2", "model_size_in_billions": 1, "quantizations": ["Q4_0"],
                            "model_id": "x/y"}, models.LLMSpec)
    assert sizing.estimate_memory(spec, "Q4_0", None, "cpu") == int(1e9 * 0.6 * sizing.OVERHEAD)
    pt = msgspec.structs.replace(spec, model_format="pytorch")
    assert sizing.estimate_memory(pt, "none", None, "cpu") == int(1e9 * 4.0 * sizing.OVERHEAD)  # float32

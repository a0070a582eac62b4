"""Batching correctness: batched results equal unbatched ones; a request that fails in a batch fails alone."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest

from tests.conftest import LAUNCHES, served_mesh
from zinfer.shared.errors import TooLarge

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def bmesh(tmp_path_factory, tiny_models):
    launches = [("emb", dict(LAUNCHES["emb"], batch_wait_ms=5, max_batch_size=64)),
                ("cb", dict(LAUNCHES["hf"], continuous_batching=True)),
                ("plain", dict(LAUNCHES["hf"], continuous_batching=False)),
                ("gg", dict(model_name="custom-llama-2", model_format="ggufv2"))]
    with served_mesh(tmp_path_factory, tiny_models, "batching", launches) as m:
        yield m


def concurrently(n: int, fn):
    results, errors = {}, {}

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as exc:
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


SENTENCES = [f"sentence number {i} about {'whales ' * (i % 7)}and the sea" for i in range(48)]


def test_batched_embeddings_equal_unbatched(bmesh):
    model = bmesh.client.get_model("emb")
    alone = [model.embed_array(s) for s in SENTENCES]
    clients = [bmesh.new_client() for _ in range(len(SENTENCES))]
    results, errors = concurrently(len(SENTENCES), lambda i: clients[i].get_model("emb").embed_array(SENTENCES[i]))
    assert not errors
    for i in range(len(SENTENCES)):
        np.testing.assert_allclose(results[i], alone[i], atol=1e-5)
    mixed, _ = concurrently(6, lambda i: clients[i].get_model("emb").embed_array(SENTENCES[i * 5:i * 5 + 5]))
    for i in range(6):
        np.testing.assert_allclose(mixed[i], np.vstack(alone[i * 5:i * 5 + 5]), atol=1e-5)


def test_a_failing_request_in_a_batch_fails_alone(bmesh):
    clients = [bmesh.new_client() for _ in range(16)]

    def request(i):
        texts = ["word " * 600] if i == 7 else [f"fine request {i}"]
        return clients[i].get_model("emb").embed_array(texts)

    results, errors = concurrently(16, request)
    assert set(errors) == {7} and isinstance(errors[7], TooLarge)
    assert len(results) == 15 and all(r.shape == (1, 384) for r in results.values())


@pytest.mark.parametrize("uid", ["cb", "plain", "gg"])
def test_concurrent_streams_equal_their_lone_runs(bmesh, uid):
    prompts = [f"stream {i} says" for i in range(12)]
    cfg = {"max_tokens": 24, **GREEDY}
    model = bmesh.client.get_model(uid)
    alone = [model.generate(p, cfg) for p in prompts]
    clients = [bmesh.new_client() for _ in prompts]

    def stream(i):
        chunks = list(clients[i].get_model(uid).generate(prompts[i], {**cfg, "stream": True}))
        return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]

    results, errors = concurrently(len(prompts), stream)
    assert not errors
    for i, ref in enumerate(alone):
        text, last = results[i]
        assert text == ref["choices"][0]["text"]
        assert last["choices"][0]["finish_reason"] == ref["choices"][0]["finish_reason"]
        assert last["usage"] == ref["usage"]


def test_each_stream_keeps_its_own_max_tokens_and_stops(bmesh):
    model = bmesh.client.get_model("cb")
    base = model.generate("hello", {"max_tokens": 30, **GREEDY})["choices"][0]["text"]
    stop = base[12:15]
    clients = [bmesh.new_client() for _ in range(8)]

    def run(i):
        cfg = {"max_tokens": 3 + i, **GREEDY} if i % 2 else {"max_tokens": 30, "stop": stop, **GREEDY}
        return clients[i].get_model("cb").generate("hello", cfg)

    results, errors = concurrently(8, run)
    assert not errors
    for i, r in results.items():
        if i % 2:
            assert r["usage"]["completion_tokens"] == 3 + i and r["choices"][0]["finish_reason"] == "length"
        else:
            assert r["choices"][0]["text"] == base[:base.find(stop)]
            assert r["choices"][0]["finish_reason"] == "stop"


def test_requests_beyond_the_parallel_sequences_queue_visibly(bmesh):
    """llama.cpp decodes n_parallel sequences together; more requests wait, and `zinfer list` shows the queue."""
    bmesh.client.launch_model(model_name="custom-llama-2", model_format="ggufv2", model_uid="gg2", n_parallel=2)
    clients = [bmesh.new_client(timeout=300) for _ in range(6)]  # 3 rounds of 1,900 tokens: slow on a busy machine
    seen = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(bmesh.client.list_models()["gg2"]["queue_depth"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    results, errors = concurrently(6, lambda i: clients[i].get_model("gg2").generate(
        "hello", {"max_tokens": 1900, "ignore_eos": True, **GREEDY}))  # each runs its 1,900 tokens
    done.set()
    watcher.join()
    assert not errors and max(seen) >= 2
    assert all(r["choices"][0]["text"] == results[0]["choices"][0]["text"] for r in results.values())
    bmesh.wait(lambda: bmesh.client.list_models()["gg2"]["queue_depth"] == 0 or None, timeout=60)
    bmesh.client.terminate_model("gg2")


# ---------------------------------------------------------------- slots and memory


def _backend(engine: str, models, slots: int):
    if engine == "llama.cpp":
        from zinfer.services.worker.instance.backends.llama_cpp_backend import LlamaCppBackend

        return LlamaCppBackend(str(models["gguf"]), "cpu", 512, n_parallel=slots)
    from zinfer.services.worker.instance.backends.transformers_backend import TransformersBackend

    return TransformersBackend(str(models["pytorch"]), "cpu", "none", 512, max_sequences=slots)


def _greedy(tokens: int):
    from zinfer.services.worker.instance.backends.base import Sampling

    return Sampling(tokens, 0.0, None, None, None, (), None, ignore_eos=True)


def _run(backend, seqs: dict[int, list[int]], until: int | None = None, steps: int | None = None) -> dict:
    """Step the backend, collecting each sequence's tokens, until `until` finishes (or `steps` steps)."""
    out: dict[int, list[int]] = {s: [] for s in seqs}
    done = set()
    n = 0
    while backend.active() and (steps is None or n < steps) and (until is None or until not in done):
        for o in backend.step():
            out.setdefault(o.seq_id, []).extend(o.tokens)
            if o.finish is not None:
                done.add(o.seq_id)
        n += 1
    return out


@pytest.mark.parametrize("engine", ["llama.cpp", "transformers"])
def test_a_sequence_dropped_mid_batch_frees_its_slot_and_its_cache(tiny_models, engine):
    """What the engine does for a client that cancels: remove its sequence between two steps. The slot takes a
    new sequence at once, and that sequence (in the freed cache cells) decodes exactly as it does alone; the
    sequence that stayed is undisturbed."""
    backend = _backend(engine, tiny_models, slots=2)
    try:
        a, b, c = (backend.tokenize(f"stream {i} tells the story of") for i in range(3))
        backend.add(10, c, _greedy(24))
        lone_c = _run(backend, {10: c})[10]
        backend.add(11, b, _greedy(120))
        lone_b = _run(backend, {11: b})[11]
        assert len(lone_c) == 24 and len(lone_b) == 120
        backend.add(1, a, _greedy(400))
        backend.add(2, b, _greedy(120))
        got = _run(backend, {1: a, 2: b}, steps=20)
        assert backend.active() == backend.max_sequences == 2
        backend.remove(1)  # cancelled by its client mid-way
        assert backend.active() == 1
        backend.add(3, c, _greedy(24))  # the freed slot takes the next request at once
        rest = _run(backend, {2: b, 3: c}, until=3)
        assert rest[3] == lone_c
        assert backend.active() == 1  # b still decodes
        tail = _run(backend, {2: b})
        assert got[2] + rest[2] + tail[2] == lone_b
    finally:
        backend.close()


@pytest.mark.parametrize("adapters", [False, True])
def test_llama_cpp_sequences_moved_to_close_holes_decode_as_alone(tiny_models, adapters):
    """Sequences of one adapter set stay in neighbouring slots (slots.py): when others end inside their run, or a
    set's run has no free neighbour, sequences move to other slots, their caches copied by llama.cpp between
    decodes. Churn over 6 slots (lengths that end at different steps, arrivals as slots free, with adapters
    three sets): each set's slots are one run after every step, and every sequence's tokens equal its lone run."""
    from zinfer.shared.payloads import LoraAdapter

    backend = _backend("llama.cpp", tiny_models, slots=6)
    try:
        groups = [None]
        if adapters:
            for name in ("a", "b"):
                backend.add_adapter(LoraAdapter(lora_name=name, local_path="-"), str(tiny_models[f"lora_{name}_gguf"]))
            groups += ["a", "b"]
        work = [(backend.tokenize(f"story {i} begins when the"), groups[i % len(groups)], 6 + 5 * (i % 4))
                for i in range(14)]
        lone = []
        for i, (ids, group, n) in enumerate(work):
            backend.add(i, ids, _greedy(n)._replace(adapter=group))
            lone.append(_run(backend, {i: ids})[i])
        got: dict[int, list[int]] = {}
        waiting = list(range(len(work)))
        moved = 0
        while waiting or backend.active():
            while waiting and backend.active() < backend.max_sequences:
                i = waiting.pop(0)
                backend.add(100 + i, work[i][0], _greedy(work[i][2])._replace(adapter=work[i][1]))
            before = {seq.id: seq.slot for seq in backend._seqs.values()}
            for o in backend.step():
                got.setdefault(o.seq_id - 100, []).extend(o.tokens)
            backend._close_holes()  # what the next step (or add) does first: sequences that ended leave no hole
            moved += sum(1 for seq in backend._seqs.values() if before.get(seq.id, seq.slot) != seq.slot)
            runs: dict = {}
            for seq in backend._seqs.values():
                runs.setdefault(seq.lora, []).append(seq.slot)
            assert all(max(s) - min(s) + 1 == len(s) for s in runs.values()), runs
        assert moved > 0  # the churn did move caches: what is compared below went through copies
        assert [got[i] for i in range(len(work))] == lone
    finally:
        backend.close()


def test_llama_cpp_greedy_argmax_equals_its_sampler_chain_in_a_mixed_batch(tiny_models):
    """Plain greedy sequences skip the sampler chain: one argmax over the step's output rows picks their tokens.
    A sequence given llama.cpp's greedy sampler chain instead picks the same tokens as the argmax's lone run, and
    argmax sequences that join mid-way (their prompts prefilling while others decode) beside a sampled one equal
    their lone runs: each row of the step's logits is read for the right sequence."""
    from zinfer.services.worker.instance.backends.llama_cpp_backend import plain_greedy

    backend = _backend("llama.cpp", tiny_models, slots=4)
    try:
        prompts = [backend.tokenize(f"story {i} begins when the") for i in range(3)]
        greedy = _greedy(40)
        assert plain_greedy(greedy) and not plain_greedy(greedy._replace(repetition_penalty=1.1))
        lone = []
        for i, ids in enumerate(prompts):
            backend.add(i, ids, greedy)
            lone.append(_run(backend, {i: ids})[i])
        backend.add(100, prompts[0], greedy._replace(temperature=0.8, seed=7))  # through its sampler chain
        backend.add(10, prompts[0], greedy)
        backend._seqs[10].sampler = backend._sampler(greedy)  # llama.cpp's greedy sampler, not the argmax
        got = _run(backend, {100: prompts[0], 10: prompts[0]}, steps=5)
        backend.add(11, prompts[1], greedy)
        backend.add(12, prompts[2], greedy)
        rest = _run(backend, {10: prompts[0], 11: prompts[1], 12: prompts[2], 100: prompts[0]})
        assert got[10] + rest[10] == lone[0]
        assert rest[11] == lone[1] and rest[12] == lone[2]
        assert len(got[100] + rest[100]) == 40
    finally:
        backend.close()


@contextlib.contextmanager
def _decoded_tokens(backend, engine: str):
    """(reset, read) of a count of the tokens the engine's model decodes: llama.cpp's own counters, or a hook on the
    transformers model's forward."""
    if engine == "llama.cpp":
        import llama_cpp

        ctx = backend.ctx.ctx

        def read() -> int:
            perf = llama_cpp.llama_perf_context(ctx)
            return perf.n_p_eval + perf.n_eval

        yield (lambda: llama_cpp.llama_perf_context_reset(ctx)), read
        return
    seen: list[int] = []
    hook = backend.model.register_forward_pre_hook(
        lambda _module, _args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True)
    try:
        yield seen.clear, lambda: sum(seen)
    finally:
        hook.remove()


@pytest.mark.parametrize("engine", ["llama.cpp", "transformers"])
def test_choices_of_one_request_prefill_once(tiny_models, engine):
    """The choices of one request (n): the first prefills the prompt, the others take its prefill (llama.cpp: a copy
    of its cache stream; transformers: its last logits and cache rows) and draw their first token from its logits.
    The model decodes the prompt once, not three times, and each sampled choice (seeds 7, 8, 9) equals the same
    seed's lone run."""
    backend = _backend(engine, tiny_models, slots=3)
    try:
        prompt = backend.tokenize("Once upon a time there was a village by the sea where the fishermen " * 6)
        sampled = [_greedy(12)._replace(temperature=0.9, seed=seed) for seed in (7, 8, 9)]
        lone = []
        for i, sampling in enumerate(sampled):
            backend.add(i, prompt, sampling)
            lone.append(_run(backend, {i: prompt})[i])
        decoded = {}
        with _decoded_tokens(backend, engine) as (reset, read):
            for share in (False, True):
                reset()
                ids = [100 * (1 + share) + i for i in range(3)]
                for seq_id, sampling in zip(ids, sampled, strict=True):
                    backend.add(seq_id, prompt, sampling,
                                same_prompt_as=ids[0] if share and seq_id != ids[0] else None)
                got = _run(backend, dict.fromkeys(ids, prompt))
                assert [got[seq_id] for seq_id in ids] == lone
                decoded[share] = read()
        assert len(prompt) > 80 and decoded[False] - decoded[True] == 2 * len(prompt)
    finally:
        backend.close()


def test_embedding_token_counts_are_untruncated_after_encodes(tiny_models):
    """The worker counts tokens (usage, and the max_tokens check) with a copy of the fast tokenizer: the same
    counts as the transformers call, and still whole after encode() has switched truncation and padding on in the
    tokenizer it shares (a text over the encoder's max_seq_length must count in full, to be refused)."""
    from zinfer.services.worker.instance.backends.sentence_backend import SentenceTransformersBackend

    backend = SentenceTransformersBackend(str(tiny_models["embedding"]), "cpu", 256)
    try:
        assert backend._counter is not None  # MiniLM's tokenizer is a fast one
        texts = ["whales " * 600, "how do whales sleep at night", "naïve café déjà vu 🐋", ""]
        before = backend.token_counts(texts)
        backend.encode(texts)
        assert backend.token_counts(texts) == before == backend._slow_counts(texts)
        assert before[0] > backend.model.max_seq_length
    finally:
        backend.close()


def test_small_batches_skip_encode_and_give_its_vectors(tiny_models):
    """Up to 32 texts run as one forward pass on features built by the Rust tokenizer (encode()'s per-call
    overhead is 0.5-2 ms of a one-sentence request): the same features as the model's preprocess() and the same
    vectors as encode(), for texts of every kind, one over max_seq_length included; bigger batches use encode()."""
    from sentence_transformers import SentenceTransformer

    from zinfer.services.worker.instance.backends import sentence_backend

    backend = sentence_backend.SentenceTransformersBackend(str(tiny_models["embedding"]), "cpu", 256)
    try:
        assert backend._featurizer is not None and not backend.model.training
        texts = ["how do whales sleep", "", "naïve café déjà vu 🐋", "whales " * 600, "  two  spaces  ", "A" * 3]
        raw = SentenceTransformer(str(tiny_models["embedding"]), device="cpu")
        np.testing.assert_allclose(backend.encode(texts), raw.encode(texts), atol=1e-6)
        np.testing.assert_allclose(backend.encode(texts[:1]), raw.encode(texts[:1]), atol=1e-6)
        many = [f"sentence {i} " * (i % 7 + 1) for i in range(sentence_backend.DIRECT_MAX + 5)]
        np.testing.assert_allclose(backend.encode(many), raw.encode(many), atol=1e-6)
    finally:
        backend.close()


def test_memory_stays_bounded_over_1000_sequential_requests(bmesh):
    """1,000 requests one after another (generate on llama.cpp and transformers, streams, chat, embed): the
    worker's resident memory after the first 200 is where it stays (a leak per request of a KV cache, a
    sampler or a stream buffer would show as megabytes)."""
    import psutil

    worker = psutil.Process(bmesh.procs["worker/cpu"].pid)
    c = bmesh.client
    gg, cb, emb = c.get_model("gg"), c.get_model("cb"), c.get_model("emb")
    calls = [
        lambda i: gg.generate(f"request {i} says", {"max_tokens": 8, **GREEDY}),
        lambda i: list(cb.generate(f"request {i} says", {"max_tokens": 8, "stream": True, **GREEDY})),
        lambda i: gg.chat([{"role": "user", "content": f"request {i}"}], generate_config={"max_tokens": 4}),
        lambda i: emb.create_embedding([f"request {i} about whales"] * 4),
    ]
    rss = {}
    for i in range(1000):
        calls[i % len(calls)](i)
        if i + 1 in (200, 1000):
            rss[i + 1] = worker.memory_info().rss
    grown = rss[1000] - rss[200]
    assert grown < 48 * 2**20, f"the worker grew by {grown / 2**20:.1f} MiB over 800 requests"

"""The batchers without a model: admission, the queue limit, stop words, n choices, streaming and cancellation,
preparing beside the decode, on a scripted backend whose every token is known. The real backends are checked
against their libraries in test_inference.py; this checks the batcher around them."""

from __future__ import annotations

import threading
import time

import pytest

from zinfer.services.worker.instance.backends.base import LLMBackend, Sampling, StepOut
from zinfer.services.worker.instance.compute import Job
from zinfer.services.worker.instance.llm_batcher import LLMBatcher
from zinfer.shared import protocol as p
from zinfer.shared import wire
from zinfer.shared.errors import QueueFull, Unavailable
from zinfer.shared.models import parse_llm
from zinfer.shared.payloads import GenerateConfig
from zinfer.shared.transport import RequestContext

SCRIPT = "abcdefghij"  # what every sequence says, one character a token


class Detok:
    def push(self, token_ids: list[int]) -> str:
        return "".join(map(chr, token_ids))

    def flush(self) -> str:
        return ""


class ScriptedBackend(LLMBackend):
    """Characters are tokens; each sequence says SCRIPT from its start, to max_tokens ("length")."""

    engine = "scripted"
    context_length = 64

    def __init__(self, max_sequences: int):
        self.max_sequences = max_sequences
        self.seqs: dict[int, tuple[int, Sampling]] = {}
        self.removed: list[int] = []

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def token_text(self, token_id: int) -> str:
        return chr(token_id)

    def detokenizer(self) -> Detok:
        return Detok()

    def add(self, seq_id: int, prompt_ids: list[int], sampling: Sampling, same_prompt_as: int | None = None) -> None:
        assert len(self.seqs) < self.max_sequences, "the engine admitted more than the backend holds"
        self.seqs[seq_id] = (0, sampling)

    def step(self) -> list[StepOut]:
        out = []
        for seq_id, (done, sampling) in list(self.seqs.items()):
            token = ord(SCRIPT[done % len(SCRIPT)])
            finish = "length" if done + 1 >= sampling.max_tokens else None
            self.seqs[seq_id] = (done + 1, sampling)
            if finish:
                del self.seqs[seq_id]
            out.append(StepOut(seq_id, [token], finish))
        return out

    def remove(self, seq_id: int) -> None:
        self.removed.append(seq_id)
        self.seqs.pop(seq_id, None)

    def active(self) -> int:
        return len(self.seqs)


class Replies:
    """Stands where the I/O thread would: what each request was sent, decoded, in order."""

    def __init__(self):
        self.sent: dict[bytes, list[tuple[bool, p.Msg]]] = {}

    def send(self, frames: list) -> None:
        command, _client, req_id, body = frames[:4]
        self.sent.setdefault(req_id, []).append((command == wire.REPLY, p.decode_reply(body)))

    def job(self, req_id: bytes, msg: p.Msg) -> Job:
        return Job(msg, RequestContext(self, b"client", req_id, p.parse_caller(b"user alice")))

    def final(self, req_id: bytes) -> p.Msg:
        (last_final, last), *_ = reversed(self.sent[req_id])
        assert last_final and sum(final for final, _ in self.sent[req_id]) == 1
        return last


FAMILY = parse_llm({"model_name": "scripted", "model_lang": ["en"], "model_ability": ["generate"],
                    "context_length": 64, "model_specs": [{"model_format": "pytorch", "model_size_in_billions": 1,
                                                           "quantizations": ["none"], "model_id": "x/y"}]})


def engine(max_sequences: int = 1, max_queue: int = 8) -> tuple[LLMBatcher, ScriptedBackend]:
    backend = ScriptedBackend(max_sequences)
    return LLMBatcher("m", FAMILY, backend, wake=lambda: None, max_queue=max_queue), backend


def generate(max_tokens: int, **config) -> p.Generate:
    return p.Generate(model_uid="m", prompt="hi", config=GenerateConfig(max_tokens=max_tokens, **config))


def settle(e: LLMBatcher) -> None:
    """Until the preparing thread has made every submitted request ready (the compute loop is woken then)."""
    assert e.preparer.wait_idle(30), "a request was never made ready"


def run(e: LLMBatcher, limit: int = 100) -> int:
    settle(e)
    steps = 0
    while e.has_work():
        e.step()
        steps += 1
        assert steps < limit, "the engine never finished"
    return steps


def test_requests_beyond_the_backends_sequences_wait_their_turn():
    e, _ = engine(max_sequences=1)
    out = Replies()
    e.submit(out.job(b"1", generate(3)))
    e.submit(out.job(b"2", generate(2)))
    settle(e)
    e.step()
    assert (e.inflight(), e.depth()) == (1, 1)  # the second waits for the only sequence
    steps = run(e)
    assert steps == 4  # 3 - 1 tokens of the first after the first step, then 2 of the second: one at a time
    for req_id, text in ((b"1", "abc"), (b"2", "ab")):
        reply = out.final(req_id)
        assert isinstance(reply, p.Completion) and reply.choices[0].text == text
        assert reply.choices[0].finish_reason == "length"
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, len(text))
    assert (e.stats.requests, e.stats.tokens_in, e.stats.tokens_out) == (2, 4, 5)


def test_a_full_queue_refuses_at_once():
    e, _ = engine(max_queue=2)
    out = Replies()
    e.submit(out.job(b"1", generate(2)))
    e.submit(out.job(b"2", generate(2)))
    with pytest.raises(QueueFull, match="holds 2 requests"):
        e.submit(out.job(b"3", generate(2)))


def test_a_stop_word_cuts_the_text_and_frees_the_sequence():
    e, backend = engine()
    out = Replies()
    e.submit(out.job(b"1", generate(8, stop=["de"])))
    run(e)
    reply = out.final(b"1")
    assert reply.choices[0].text == "abc" and reply.choices[0].finish_reason == "stop"
    assert backend.removed == [0] and backend.active() == 0


def test_n_choices_decode_side_by_side():
    e, _ = engine(max_sequences=4)
    out = Replies()
    e.submit(out.job(b"1", generate(2, n=3)))
    assert run(e) == 2
    reply = out.final(b"1")
    assert [c.text for c in reply.choices] == ["ab"] * 3 and [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == 6


def test_a_stream_sends_each_token_then_one_final_reply():
    e, _ = engine()
    out = Replies()
    e.submit(out.job(b"1", generate(3, stream=True, stream_interval_ms=0)))
    run(e)
    texts = [msg.choices[0].text for final, msg in out.sent[b"1"] if msg.choices]
    assert "".join(texts) == "abc" and len(texts) == 3
    assert out.final(b"1").choices[0].finish_reason == "length"


def test_a_cancelled_request_gives_its_sequence_to_the_next():
    e, backend = engine(max_sequences=1)
    out = Replies()
    first, second = out.job(b"1", generate(50)), out.job(b"2", generate(2))
    e.submit(first)
    e.submit(second)
    settle(e)
    e.step()
    first.ctx.cancelled = True  # the client went away (a CANCEL frame, on the I/O thread)
    run(e)
    cancelled = out.final(b"1")
    assert isinstance(cancelled, p.Error) and cancelled.code == "cancelled"
    assert out.final(b"2").choices[0].text == "ab"
    assert backend.removed == [0] and (e.stats.cancelled, e.stats.requests) == (1, 2)


class GatedBackend(ScriptedBackend):
    """Tokenizing the prompt "slow" waits for the test's gate, as a long prompt, a big image or a new grammar
    keeps a request in preparation."""

    def __init__(self, max_sequences: int):
        super().__init__(max_sequences)
        self.entered, self.gate = threading.Event(), threading.Event()

    def tokenize(self, text: str) -> list[int]:
        if text == "slow":
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return super().tokenize(text)


def slow() -> p.Generate:
    return p.Generate(model_uid="m", prompt="slow", config=GenerateConfig(max_tokens=2))


def test_a_request_being_prepared_holds_up_no_stream():
    """Preparing a request (its template, tokens, images, grammar) runs beside the decode: while one request's
    prompt is still being tokenized, the stream already running goes on to its end, token by token."""
    backend = GatedBackend(max_sequences=2)
    e = LLMBatcher("m", FAMILY, backend, wake=lambda: None, max_queue=8)
    out = Replies()
    e.submit(out.job(b"1", generate(6, stream=True, stream_interval_ms=0)))
    settle(e)
    e.step()
    e.submit(out.job(b"2", slow()))
    assert backend.entered.wait(30)
    for _ in range(5):  # on the compute loop's side; before preparing had a thread, the first of these waited
        e.step()
    texts = [msg.choices[0].text for _final, msg in out.sent[b"1"] if msg.choices]
    assert "".join(texts) == "abcdef" and out.final(b"1").choices[0].finish_reason == "length"
    assert b"2" not in out.sent and (e.inflight(), e.depth()) == (1, 0)  # being prepared: in flight, not queued
    backend.gate.set()
    run(e)
    assert out.final(b"2").choices[0].text == "ab"
    assert (e.stats.requests, e.stats.failures) == (2, 0)


def test_stopping_answers_the_request_being_prepared_and_takes_no_more():
    backend = GatedBackend(max_sequences=1)
    e = LLMBatcher("m", FAMILY, backend, wake=lambda: None, max_queue=8)
    out = Replies()
    e.submit(out.job(b"1", slow()))
    assert backend.entered.wait(30)
    e.submit(out.job(b"2", generate(2)))  # arrived, waiting behind the one being prepared
    e.stop(Unavailable("model 'm' was terminated"))
    assert out.final(b"2").code == "unavailable"
    with pytest.raises(Unavailable, match="terminated"):
        e.submit(out.job(b"3", generate(2)))
    backend.gate.set()  # its preparation ends: it is answered then, not left waiting
    deadline = time.monotonic() + 30
    while b"1" not in out.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert out.final(b"1").code == "unavailable" and not e.has_work()


def test_a_refusal_found_in_preparing_is_answered_and_counted_on_the_loop():
    e, _ = engine()
    out = Replies()
    e.submit(out.job(b"1", generate(2, n=3)))  # more choices than the backend's one sequence
    e.submit(out.job(b"2", generate(2)))
    run(e)
    refused = out.final(b"1")
    assert isinstance(refused, p.Error) and refused.code == "invalid" and refused.field == "n"
    assert out.final(b"2").choices[0].text == "ab"
    assert (e.stats.requests, e.stats.failures) == (2, 1)


# ---------------------------------------------------------------- rerank and embedding engines (scripted backend)


class ScoringBackend:
    """Scores a (query, document) pair by the document's length (ties on purpose), embeds a text as a fixed
    unit vector; records each batch it is given."""

    dimensions = 4
    max_tokens = 16
    normalized = True

    def __init__(self):
        self.batches: list[int] = []

    def token_counts(self, items) -> list[int]:
        return [min(self.max_tokens, 2 + len(item[1] if isinstance(item, tuple) else item)) for item in items]

    def encode(self, items):
        import numpy as np

        self.batches.append(len(items))
        if items and isinstance(items[0], tuple):
            return np.asarray([float(len(d)) for _, d in items], dtype=np.float32)
        return np.tile(np.asarray([0.5, 0.5, 0.5, 0.5], dtype=np.float32), (len(items), 1))


def test_rerank_engine_batches_requests_orders_as_xinference_and_cuts_to_top_n():
    import numpy as np

    from zinfer.services.worker.instance.rerank_batcher import RerankBatcher

    out, backend = Replies(), ScoringBackend()
    eng = RerankBatcher("rr", backend, wake=lambda: None, max_queue=8, max_batch_size=5, max_batch_tokens=1000)
    documents = ["aaa", "a", "aaaa", "aa", "aaa", "a"]
    eng.submit(out.job(b"1", p.Rerank(model_uid="rr", query="q", documents=documents)))
    eng.submit(out.job(b"2", p.Rerank(model_uid="rr", query="q", documents=["bb", "b"], top_n=1)))
    while eng.has_work():
        eng.step()
    assert backend.batches == [5, 3]  # at most max_batch_size pairs a step; request 1's rest with request 2's
    first = out.final(b"1")
    scores = np.asarray([float(len(d)) for d in documents], dtype=np.float32)
    assert [r.index for r in first.results] == list(np.argsort(scores)[::-1])  # ties as numpy orders them
    assert first.input_tokens == sum(2 + len(d) for d in documents)
    second = out.final(b"2")
    assert [(r.index, r.relevance_score) for r in second.results] == [(0, 2.0)]


def test_embedding_engine_cuts_dimensions_and_refuses_more_than_it_makes():
    import numpy as np

    from zinfer.services.worker.instance.embed_batcher import EmbeddingBatcher
    from zinfer.shared.errors import InvalidRequest

    out, backend = Replies(), ScoringBackend()
    eng = EmbeddingBatcher("emb", backend, wake=lambda: None, max_queue=8)
    eng.submit(out.job(b"1", p.Embed(model_uid="emb", input=["x", "y"], dimensions=2)))
    with pytest.raises(InvalidRequest, match="at most 4") as info:
        eng.submit(out.job(b"2", p.Embed(model_uid="emb", input=["x"], dimensions=5)))
    assert info.value.field == "dimensions"
    backend.normalized = False
    with pytest.raises(InvalidRequest, match="not normalised"):
        eng.submit(out.job(b"3", p.Embed(model_uid="emb", input=["x"], dimensions=2)))
    while eng.has_work():
        eng.step()
    reply = out.final(b"1")
    assert (reply.rows, reply.dimensions) == (2, 2)
    from zinfer.services.worker.instance.embed_batcher import cut

    np.testing.assert_allclose(cut(np.asarray([[3.0, 4.0, 1.0], [0.0, 0.0, 1.0]], np.float32), 2),
                               [[0.6, 0.8], [0.0, 0.0]])  # renormalised; an all-zero cut stays zero

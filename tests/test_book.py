"""The scheduler's book without a mesh: replica states, the view `zinfer list` shows, and the launch file."""

from __future__ import annotations

import json

import msgspec

from zinfer.services.scheduler.book import LaunchBook, LaunchRecord, Model, Replica, WorkerState, view
from zinfer.services.scheduler.machine import Phase
from zinfer.shared import instances
from zinfer.shared import protocol as p
from zinfer.shared.errors import InvalidRequest
from zinfer.shared.models import EmbeddingFamily

INFO = instances.InstanceInfo(model_name="emb", model_type="embedding", model_format="pytorch", quantization="none",
                              model_ability=["embed"], context_length=256)


def _load(replica: int = 0) -> p.LoadInstance:
    family = EmbeddingFamily(model_name="emb", dimensions=384, max_tokens=256, language=["en"], model_id="x/emb")
    return p.LoadInstance(model_uid="e", replica=replica, incarnation=7, model_type="embedding", embedding=family)


def _worker(wid: str, host: str) -> WorkerState:
    return WorkerState(instances.DeviceInfo(worker_id=wid, host=host, device="cpu", total_memory=8, free_memory=8),
                       last_seen=0.0)


def test_a_launch_and_an_instance_report_agree_on_what_the_model_is():
    assert instances.info_of(_load()) == INFO


def test_restart_keeps_memory_and_counters_and_clears_the_rest():
    r = Replica(worker_id="cpu", index=0, load=_load(), phase=Phase.READY)
    stats = instances.InstanceStats(requests=3)
    r.status = instances.ReplicaStatus(state="ready", pid=42, memory=100, progress=1.0, inflight=2, restarts=1,
                                       stats=stats)
    r.restart("worker cpu restarted")
    assert r.state == "restarting" and r.phase is Phase.LOST
    assert (r.status.memory, r.status.restarts, r.status.stats) == (100, 1, stats)
    assert (r.status.pid, r.status.progress, r.status.inflight, r.status.cause) == (0, 0.0, 0, "worker cpu restarted")


def test_a_replica_without_its_launch_fails_instead_of_restarting():
    r = Replica(worker_id="cpu", index=0)  # adopted from a report: nothing to load it again with
    r.restart("worker cpu restarted")
    assert r.state == "failed" and r.phase is Phase.FAILED
    assert r.status.error.code == "unavailable" and "cannot be loaded again" in r.status.error.message


def test_the_view_sums_replicas_and_names_the_first_failure():
    m = Model(uid="e", info=INFO, incarnation=7)
    a, b = Replica(worker_id="cpu", index=0, load=_load(0)), Replica(worker_id="cpu:1", index=1, load=_load(1))
    a.status = instances.ReplicaStatus(state="ready", memory=10, queue_depth=1, pid=5,
                                       stats=instances.InstanceStats(requests=2, tokens_in=9))
    b.status = instances.ReplicaStatus(state="ready", memory=30, queue_depth=2, pid=6, restarts=1, cause="SIGSEGV",
                                       stats=instances.InstanceStats(requests=1))
    m.replicas = [a, b]
    workers = {"cpu": _worker("cpu", "h1")}
    v = view(m, workers)
    assert (v.state, v.memory, v.queue_depth, v.pids, v.restarts) == ("ready", 40, 3, [5, 6], 1)
    assert (v.stats.requests, v.stats.tokens_in) == (3, 9) and v.restart_cause == "SIGSEGV"
    assert v.hosts == ["h1", "?"] and v.address == ["h1/worker/cpu", "?/worker/cpu:1"] and v.error is None
    b.fail("bad file", "invalid", "model_uri")
    v = view(m, workers)
    assert v.state == "failed" and v.error == p.Error(code="invalid", message="bad file", field="model_uri")
    m.launch_failed(InvalidRequest("the launch's own", field="dimensions"))
    assert view(m, workers).error.message == "the launch's own"  # the launch's failure comes first


def test_the_launch_file_round_trips(tmp_path):
    book = LaunchBook(tmp_path)
    m = Model(uid="e", info=INFO, incarnation=7, replicas=[Replica(worker_id="cpu", index=0, load=_load())])
    m.launch_failed(InvalidRequest("bad", field="model_uri"))
    book.save([LaunchRecord.of(m)])
    (back,) = [r.model() for r in book.load()]
    assert (back.uid, back.info, back.error, back.incarnation) == ("e", INFO, m.error, 7)
    assert [(r.worker_id, r.index, r.load) for r in back.replicas] == [("cpu", 0, _load())]


def test_a_launch_file_of_the_flat_format_is_read(tmp_path):
    """Files written before the info and error were nested: nothing launched is forgotten on upgrade."""
    old = {"uid": "e", "model_name": "emb", "model_type": "embedding", "model_format": "pytorch",
           "quantization": "none", "replicas": [["cpu", 0]], "error": "it broke", "error_code": "invalid",
           "error_field": "model_uri", "incarnation": 7, "loads": [msgspec.to_builtins(_load())]}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "launched.json").write_text(json.dumps([old]))
    (record,) = LaunchBook(tmp_path).load()
    assert record.info.model_name == "emb" and record.info.model_type == "embedding"
    assert record.error == p.Error(code="invalid", message="it broke", field="model_uri")
    assert record.model().replicas[0].load == _load()

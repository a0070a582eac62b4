"""The bus core (shared/buscore.py) under the sync client and the gateway, without a mesh; and the import graph."""

from __future__ import annotations

import ast
import base64
from pathlib import Path

import numpy as np
import pytest
import zmq

from zinfer.shared import buscore, instances, wire
from zinfer.shared import protocol as p
from zinfer.shared.errors import (
    InstanceNotReady,
    InvalidRequest,
    NoRoute,
    NotFound,
    QueueFull,
    RequestTimeout,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

REPO = Path(__file__).resolve().parents[1]


def test_requests_number_their_frames_and_refuse_oversized_messages():
    requests = buscore.Requests(max_message_bytes=1000, max_message_mb=1)
    first, frames = requests.frames("model/x", p.Ping())
    second, _ = requests.frames(b"model/x", p.Ping())
    assert first[:4] == second[:4] and first != second and frames[:3] == [wire.REQUEST, b"model/x", first]
    with pytest.raises(TooLarge, match=r"this Embed is [\d,]+ bytes; messages are limited to 1 MiB"):
        requests.frames("model/x", p.Embed(model_uid="x", input=["a" * 2000]))


def test_replies_decode_to_messages_or_typed_errors():
    ok = [wire.REPLY, b"id", p.encode(p.Pong()), b"buffer"]
    assert buscore.read_reply(ok) == (wire.REPLY, p.Pong(), [b"buffer"])
    frame = zmq.Frame(p.encode(p.Pong()))
    assert buscore.read_reply([zmq.Frame(wire.PARTIAL), b"id", frame])[:2] == (wire.PARTIAL, p.Pong())
    for code, cls in (("queue_full", QueueFull), ("no_route", NoRoute), ("invalid", InvalidRequest)):
        with pytest.raises(cls) as err:
            buscore.read_reply([wire.REPLY, b"id", p.encode(p.Error(code=code, message="m", field="f"))])
        assert err.value.field == "f"
    with pytest.raises(Unavailable, match="undecodable reply"):
        buscore.read_reply([wire.REPLY, b"id", b"\xc1garbage"])


def test_a_stream_ends_with_its_final_reply():
    chunk = p.Pong(payload=b"1")
    assert buscore.stream_step(wire.PARTIAL, chunk) == (False, chunk)
    assert buscore.stream_step(wire.REPLY, chunk) == (True, chunk)  # the last chunk, final
    assert buscore.stream_step(wire.REPLY, p.Ok(message="end of stream")) == (True, None)


def test_monitor_events():
    state = buscore.MonitorState(refused="refused!", mismatch="other mesh")
    assert state.apply(zmq.EVENT_HANDSHAKE_SUCCEEDED) is None and state.up
    lost = state.apply(zmq.EVENT_DISCONNECTED)
    assert isinstance(lost, Unavailable) and state.lost and not state.up and state.failure is None
    refused = state.apply(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    assert isinstance(refused, Unauthenticated) and state.failure is refused and str(refused) == "refused!"
    fresh = buscore.MonitorState(refused="", mismatch="other mesh")
    assert str(fresh.apply(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)) == "other mesh"


def view(state: str, **kw) -> instances.InstanceView:
    return instances.InstanceView(model_uid="u", info=instances.InstanceInfo(model_name="m", model_type="LLM"),
                                  state=state, **kw)


def test_waiting_for_a_launch():
    assert buscore.launch_done("u", view("ready"), expired=True, timeout=1) is True
    assert buscore.launch_done("u", view("launching"), expired=False, timeout=1) is False
    with pytest.raises(InvalidRequest, match="model 'u' failed to launch: bad file") as err:
        buscore.launch_done("u", view("failed", error=p.Error(code="invalid", message="bad file", field="model_uri")),
                            expired=False, timeout=1)
    assert err.value.field == "model_uri"
    with pytest.raises(RequestTimeout, match="still launching after 2s"):
        buscore.launch_done("u", view("launching"), expired=True, timeout=2)


def test_nothing_serving_is_explained_and_other_errors_pass():
    busy = QueueFull("nothing serves 'model/u' yet and the broker's queue for such requests is full")
    assert buscore.not_serving("u", busy, None, "model") is busy  # a full queue is not "not running"
    gone = NoRoute("nothing serves 'model/u'")
    missing = buscore.not_serving("u", gone, None, "model")
    assert isinstance(missing, NotFound) and missing.field == "model"
    crashed = view("restarting", error=p.Error(code="unavailable", message="SIGSEGV"))
    loading = buscore.not_serving("u", gone, crashed, "model_uid")
    assert isinstance(loading, InstanceNotReady) and str(loading) == "model_uid: model 'u' is restarting: SIGSEGV"
    joining = buscore.not_serving("u", gone, view("ready"), "model_uid")  # the broker has not heard it yet
    assert type(joining) is Unavailable and "has not joined the broker yet" in str(joining)


def test_a_view_has_the_models_fields_at_the_top_and_its_error_nested():
    """Xinference's list_models shape: model_name, model_type, ... beside model_uid, not under a key."""
    failed = view("failed", error=p.Error(code="invalid", message="bad file", field="model_uri"))
    plain = buscore.view_plain(failed)
    assert list(plain)[:3] == ["model_uid", "model_name", "model_type"] and "info" not in plain
    assert plain["error"] == {"code": "invalid", "message": "bad file", "field": "model_uri", "problems": []}
    assert buscore.view_plain(view("ready"))["error"] is None


def test_embedding_results_as_floats_and_base64():
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    reply = p.Embedding(model="u", rows=2, dimensions=3, prompt_tokens=7)
    vectors = buscore.embedding_array(reply, [memoryview(rows).cast("B").tobytes()])
    assert vectors.tolist() == rows.tolist()
    result = buscore.embedding_result("u", reply, vectors)
    assert result["data"][1] == {"object": "embedding", "index": 1, "embedding": [3.0, 4.0, 5.0]}
    assert result["usage"] == {"prompt_tokens": 7, "total_tokens": 7} and result["model"] == "u"
    b64 = buscore.embedding_result("u", reply, vectors, "base64")["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(b64), dtype=np.float32).tolist() == [0.0, 1.0, 2.0]


def _imports(path: Path, package_root: Path) -> set[str]:
    """The project modules a file imports, anywhere in it (a lazy import inside a function closes a circle as
    surely as one at the top), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_import_circles():
    modules = {}
    for top in ("shared", "services", "cli"):
        for path in (REPO / top).rglob("*.py"):
            name = "zinfer." + ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph = {name: sorted(m for m in _imports(path, REPO) if m in modules and m != name)
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in graph[name]:
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


# ---------------------------------------------------------------- the wake -> wait -> retry -> explain policy

def _view(**kw) -> instances.InstanceView:
    return instances.InstanceView(model_uid="m", info=instances.InstanceInfo(model_name="m", model_type="LLM"), **kw)


def _walk(exc, attempt, answers: dict):
    """recover()'s steps under a scripted scheduler: answers[step] is the result, or an error to raise."""
    from zinfer.shared.errors import ZinferError

    taken = []

    def perform(step):
        taken.append(step)
        answer = answers.get(step)
        if isinstance(answer, ZinferError):
            raise answer
        return answer

    return buscore.drive(buscore.recover("m", exc, attempt, "model_uid"), perform), taken


def test_the_recover_policy_wakes_an_unloaded_instance_and_explains_the_rest():
    from zinfer.shared.errors import InvalidRequest, NoRoute, NotFound, QueueFull, Unavailable

    unloaded = _view(state="idle-unloaded", unloaded_at=5.0)
    result, taken = _walk(NoRoute("nobody"), 0, {buscore.DESCRIBE: unloaded})
    assert result is None and taken == [buscore.DESCRIBE, buscore.WAKE, buscore.WAIT]  # loaded: send it again
    # the last attempt: no more loads, the state explained
    result, taken = _walk(NoRoute("nobody"), buscore.WAKES, {buscore.DESCRIBE: _view(state="failed")})
    assert taken == [buscore.DESCRIBE] and "is failed" in str(result) and result.field == "model_uid"
    # no such uid
    result, taken = _walk(NoRoute("nobody"), 0, {buscore.DESCRIBE: NotFound("no")})
    assert isinstance(result, NotFound) and "no launched model has uid 'm'" in str(result)
    # the scheduler cannot say: the request's own error stands, asked once
    own = NoRoute("nobody")
    result, taken = _walk(own, 0, {buscore.DESCRIBE: Unavailable("busy")})
    assert result is own and taken == [buscore.DESCRIBE]
    # loaded and ready but it refused: no scheduler round trip at all
    for exc in (InvalidRequest("bad", field="x"), QueueFull("full")):
        result, taken = _walk(exc, 0, {})
        assert result is exc and taken == []
    # a load on request that fails is the request's error
    with pytest.raises(Unavailable, match="no room"):
        _walk(NoRoute("nobody"), 0, {buscore.DESCRIBE: unloaded, buscore.WAKE: Unavailable("no room")})

"""Faults, and what the mesh says and does through them (real processes on loopback)."""

from __future__ import annotations

import errno
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import embedding_definition, llm_definition
from tests.mesh import REPO, Mesh
from tests.test_mesh import start_peer
from zinfer.shared.errors import (
    InstanceNotReady,
    InvalidRequest,
    StorageError,
    TooLarge,
    Unavailable,
    ZinferError,
    storage_error,
)


def states(client) -> dict[str, str]:
    return {uid: m["state"] for uid, m in client.list_models().items()}


def _prepare(m: Mesh, root, tiny_models) -> Mesh:
    """Production-like liveness (1 s heartbeats) and two instances on its CPU worker; embed requests of up to
    20,000 texts (the default max_embed_items is 2,048)."""
    (root / "z.toml").write_text("max_embed_items = 20000\n")
    m.env["ZINFER_CONFIG"] = str(root / "z.toml")
    m.start_all()
    m.client.register_model("LLM", llm_definition(tiny_models))
    m.client.register_model("embedding", embedding_definition(tiny_models))
    m.client.launch_model(model_name="custom-llama-2", model_format="ggufv2", model_uid="gg")
    m.client.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="emb")
    return m


@pytest.fixture
def served_mesh(tmp_path, tiny_models):
    """A mesh of its own, for a test that kills or stops its parts."""
    m = Mesh(tmp_path / "home", tmp_path, heartbeat=1.0)
    try:
        yield _prepare(m, tmp_path, tiny_models)
    finally:
        m.stop()


@pytest.fixture(scope="module")
def calm_mesh(tmp_path_factory, tiny_models):
    """One mesh shared by the tests that leave it as they found it (what they launch, they terminate)."""
    root = tmp_path_factory.mktemp("calm")
    m = Mesh(root / "home", root, heartbeat=1.0)
    try:
        yield _prepare(m, root, tiny_models)
    finally:
        m.stop()


# ---------------------------------------------------------------- state from truth


def test_instances_are_ready_again_after_a_6_s_broker_outage(served_mesh):
    m = served_mesh
    m.kill("broker")
    time.sleep(6)  # the fault itself: the broker stays away this long (the scheduler expires the worker meanwhile)
    m.start_broker()
    m.wait_services({"scheduler", "worker/cpu"}, timeout=30)
    back = time.monotonic()
    m.wait(lambda: states(m.client) == {"gg": "ready", "emb": "ready"} or None, timeout=30)
    assert time.monotonic() - back <= 2 * 1.0 + 0.5  # within 2 heartbeat intervals of the services' return
    assert m.client.get_model("gg").generate("hi", {"max_tokens": 3, "temperature": 0})["usage"]
    assert len(m.client.get_model("emb").create_embedding("hi")["data"]) == 1


def test_a_stalled_worker_is_restarting_then_ready_again(served_mesh):
    """A busy machine that delays a worker's reports past the liveness window: its instances are `restarting`
    (the scheduler cannot vouch for them) while it is silent, and `ready` again as soon as it reports. Their own
    processes never stopped: they answer requests throughout."""
    m = served_mesh
    worker = m.procs["worker/cpu"]
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        m.wait(lambda: states(m.client)["emb"] == "restarting" or None, timeout=20)
        assert "stopped reporting" in m.client.describe_model("emb")["restart_cause"]
        assert len(m.client.get_model("emb").create_embedding("hi")["data"]) == 1
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    m.wait(lambda: states(m.client) == {"gg": "ready", "emb": "ready"} or None, timeout=20)
    assert m.client.describe_model("emb")["error"] is None
    assert len(m.client.get_model("emb").create_embedding("hi")["data"]) == 1


def test_a_restarted_worker_gets_its_instances_back_and_a_uid_relaunches(served_mesh):
    m = served_mesh
    m.kill("worker/cpu")
    # Nothing holds them now: `restarting`, with the reason, never `ready`; requests say why.
    m.wait(lambda: states(m.client).get("emb") == "restarting" or None, timeout=20)
    assert "worker cpu" in m.client.describe_model("emb")["restart_cause"]
    with pytest.raises((InstanceNotReady, Unavailable)):
        m.client.get_model("emb").create_embedding("hi", timeout=10)
    m.start_worker("cpu")
    m.wait(lambda: states(m.client) == {"gg": "ready", "emb": "ready"} or None, timeout=60)
    assert len(m.client.get_model("emb").create_embedding("hi")["data"]) == 1
    m.client.terminate_model("emb")
    assert "emb" not in m.client.list_models()
    m.client.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="emb")
    assert m.client.describe_model("emb")["state"] == "ready"
    assert len(m.client.get_model("emb").create_embedding("hi")["data"]) == 1


def test_an_acknowledged_launch_survives_a_scheduler_and_worker_crash(served_mesh):
    """Worker and scheduler die together: the restarted scheduler remembers the launches (its launch book) and
    loads them again on the returning worker, instead of forgetting the uids."""
    m = served_mesh
    m.kill("worker/cpu")
    m.kill("scheduler")
    m.start("scheduler", "scheduler")
    m.start_worker("cpu")
    m.wait_services({"scheduler", "worker/cpu"})
    m.wait(lambda: states(m.client) == {"gg": "ready", "emb": "ready"} or None, timeout=60)
    assert m.client.get_model("gg").generate("hi", {"max_tokens": 2, "temperature": 0})["usage"]
    for uid in ("gg", "emb"):
        m.client.terminate_model(uid)
    m.kill("scheduler")  # a terminated uid stays terminated across another restart
    m.start("scheduler", "scheduler")
    m.wait_services({"scheduler"})
    m.wait(lambda: m.client.scheduler_status()["workers"] or None)
    assert m.client.list_models() == {}
    m.client.launch_model(model_name="custom-llama-2", model_format="ggufv2", model_uid="gg")
    assert m.client.get_model("gg").generate("hi", {"max_tokens": 2, "temperature": 0})["usage"]


def test_a_second_worker_for_one_device_is_refused_while_the_first_answers(calm_mesh):
    m = calm_mesh
    log = open(m.log_dir / "second_worker.log", "ab")
    second = subprocess.Popen([sys.executable, "-m", "zinfer", "worker", "--device", "cpu"], env=m.env, cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        m.wait(lambda: "held by a live peer" in (m.log_dir / "second_worker.log").read_text() or None, timeout=30)
        assert second.poll() is None or second.returncode == 3  # it says why, retries, then gives up
        assert states(m.client) == {"gg": "ready", "emb": "ready"}
        assert [w["pid"] for w in m.client.scheduler_status()["workers"]] == [m.procs["worker/cpu"].pid]
    finally:
        second.kill()
        second.wait()


# ---------------------------------------------------------------- one mesh per endpoint


def _zinfer(*args, env, timeout=60):
    return subprocess.run([sys.executable, "-m", "zinfer", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def test_a_second_zinfer_up_on_a_busy_endpoint_exits_at_once(calm_mesh, tmp_path):
    m = calm_mesh
    other_home = tmp_path / "second-home"
    env = dict(os.environ, ZINFER_HOME=str(other_home), ZINFER_ENDPOINT=m.endpoint)
    start = time.monotonic()
    out = _zinfer("up", env=env, timeout=30)
    assert out.returncode != 0 and time.monotonic() - start < 5
    assert m.endpoint in out.stderr and f"pid {m.procs['broker'].pid}" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert not other_home.exists()  # nothing was started or written
    assert states(m.client) == {"gg": "ready", "emb": "ready"}
    assert sorted(peer["service"] for peer in m.client.broker_status()["peers"]) == \
        ["registry", "scheduler", "worker/cpu", "worker/cpu#emb/0", "worker/cpu#gg/0"]  # instances join themselves


def test_a_live_ipc_endpoint_is_not_taken_over(tmp_path):
    m = Mesh(tmp_path / "home", tmp_path)
    m.endpoint = f"ipc://{tmp_path}/zinfer.sock"
    m.env["ZINFER_ENDPOINT"] = m.endpoint
    m.client = m.new_client(timeout=10)
    try:
        m.start_broker()
        env = dict(m.env)
        out = _zinfer("broker", env=env, timeout=30)  # libzmq alone would unlink the path and take it over
        assert out.returncode == 1 and "in use by" in out.stderr
        out = _zinfer("up", env=dict(env, ZINFER_HOME=str(tmp_path / "other")), timeout=30)
        assert out.returncode == 1 and "in use by" in out.stderr
        assert m.client.broker_status()["pid"] == m.procs["broker"].pid
    finally:
        m.stop()
    # A stale socket file (its broker is gone) is not "in use".
    from zinfer.shared.endpoints import endpoint_holder

    assert endpoint_holder(m.endpoint) is None


# ---------------------------------------------------------------- clients fail fast


def test_a_dead_broker_fails_pending_calls_with_unavailable_soon(tmp_path):
    m = Mesh(tmp_path / "home", tmp_path)
    try:
        m.start_broker()
        start_peer(m)
        m.wait_services({"testpeer"})
        error, after = m.kill_during_a_call("broker", sleep=int(m.liveness) + 2)  # still asleep when it fails
        assert "lost the connection to the broker" in error
        assert after < m.liveness  # within the liveness window
    finally:
        m.stop()


# ---------------------------------------------------------------- sharing a worker


def test_a_huge_embed_does_not_starve_another_instance_on_the_worker(calm_mesh):
    """3,000 texts on one instance, one sentence at a time on another: the small requests wait at most for
    the batch in progress, not for the whole big request (20,000 texts used to hold them for 51.6 s)."""
    m = calm_mesh
    m.client.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="big",
                          max_batch_size=64)
    small = m.client.get_model("emb")

    def latency():
        start = time.perf_counter()
        small.create_embedding("one short sentence")
        return time.perf_counter() - start

    alone = statistics.median(latency() for _ in range(10))
    big_client = m.new_client(timeout=300)
    done = {}

    def big():
        start = time.perf_counter()
        big_client.get_model("big").embed_array([f"text {i}" for i in range(3_000)])
        done["s"] = time.perf_counter() - start

    t = threading.Thread(target=big)
    t.start()
    m.wait(lambda: m.client.list_models()["big"]["inflight"] or m.client.list_models()["big"]["queue_depth"] or None)
    during = []
    while "s" not in done and len(during) < 200:
        during.append(latency())
    t.join()
    m.client.terminate_model("big")
    batches = 3_000 / 64
    batch_s = done["s"] / batches
    assert len(during) >= 5 and done["s"] > 5 * statistics.median(during)  # they really overlapped
    # The median small request is delayed by less than 2 of the big request's batches.
    assert statistics.median(during) - alone < 2 * batch_s, (alone, statistics.median(during), batch_s)


def test_an_oversized_prompt_is_refused_at_once_without_tokenizing(calm_mesh):
    model = calm_mesh.client.get_model("gg")
    prompt = "x" * (4 * 2**20 + 1)  # one byte over max_prompt_bytes; tokenizing it would take seconds
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with pytest.raises(TooLarge, match="max_prompt_bytes") as err:
            model.generate(prompt, {"max_tokens": 1})
        times.append(time.perf_counter() - start)
    assert err.value.field == "prompt" and min(times) < 1.0  # tokenizing 4 MiB would take seconds
    with pytest.raises(TooLarge, match="max_embed_items"):
        calm_mesh.client.get_model("emb").create_embedding(["a"] * 20_001)
    assert model.generate("hi", {"max_tokens": 2, "temperature": 0})["usage"]["completion_tokens"] == 2


def test_a_runaway_chat_template_is_stopped(calm_mesh, tiny_models):
    c = calm_mesh.client
    looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages }}"
    c.register_model("LLM", llm_definition(tiny_models, "looping", chat_template=looping))
    c.launch_model(model_name="looping", model_format="ggufv2", model_uid="looping")
    start = time.monotonic()
    with pytest.raises(InvalidRequest, match="took over 1s") as err:
        c.get_model("looping").chat([{"role": "user", "content": "hi"}])
    assert err.value.field == "messages" and time.monotonic() - start < 10
    assert c.get_model("gg").generate("hi", {"max_tokens": 2, "temperature": 0})["usage"]  # the worker goes on
    c.terminate_model("looping")


def test_a_full_instance_queue_answers_unavailable_at_once(tmp_path, tiny_models):
    m = Mesh(tmp_path / "home", tmp_path)
    m.env["ZINFER_CONFIG"] = str(tmp_path / "z.toml")
    (tmp_path / "z.toml").write_text("instance_queue = 2\n")
    m.start_all()
    try:
        m.client.register_model("LLM", llm_definition(tiny_models, context_length=8192))
        # One sequence at a time on transformers (~2,000 tokens/s here): each request below runs for seconds.
        m.client.launch_model(model_name="custom-llama-2", model_format="pytorch", model_uid="hf",
                              continuous_batching=False)
        clients = [m.new_client(timeout=120) for _ in range(2)]
        ended = []

        def hold(c) -> None:
            try:
                c.get_model("hf").generate("hello", {"max_tokens": 6000, "temperature": 0})
            except ZinferError as exc:  # ended by the terminate below: what is tested is the third request
                ended.append(exc)

        threads = [threading.Thread(target=hold, args=(c,)) for c in clients]
        for t in threads:
            t.start()

        def held():
            view = m.client.list_models()["hf"]
            return view["inflight"] + view["queue_depth"] >= 2 or None

        m.wait(held)
        start = time.monotonic()
        with pytest.raises(Unavailable, match="instance_queue"):
            m.client.get_model("hf").generate("hi", {"max_tokens": 2})
        assert time.monotonic() - start < 2
        m.client.terminate_model("hf")  # the two long generations end now, not after 12,000 tokens
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
    finally:
        m.stop()


# ---------------------------------------------------------------- typed errors end to end


def test_a_workers_invalid_request_reaches_the_client_as_invalid_request(calm_mesh):
    gg = calm_mesh.client.get_model("gg")
    with pytest.raises(InvalidRequest) as err:
        gg.generate("hi", {"temperature": -1})  # checked by the worker's engine
    assert err.value.field == "temperature"
    with pytest.raises(InvalidRequest) as err:
        calm_mesh.client.get_model("emb").create_embedding([])
    assert err.value.field == "input"


def test_storage_errors_name_the_path_and_the_cause(tmp_path):
    exc = storage_error("persist the definition to", tmp_path / "x.json", OSError(errno.ENOSPC, "No space"), "persist")
    assert isinstance(exc, StorageError) and "x.json: the disk is full" in str(exc) and exc.field == "persist"
    exc = storage_error("delete", "/a/b", OSError(errno.EROFS, "Read-only file system"))
    assert "the file system is read-only" in str(exc)


def test_a_full_disk_fails_a_persisted_registration_cleanly(tmp_path, tiny_models):
    home = tmp_path / "home"
    (home / "models" / "LLM").mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(home / "models" / "LLM")],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    try:
        try:  # fill it up
            with open(home / "models" / "LLM" / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        m = Mesh(home, tmp_path)
        m.start_broker()
        m.start("registry", "registry")
        m.wait_services({"registry"})
        try:
            with pytest.raises(StorageError, match="models/LLM/custom-llama-2.json: the disk is full") as err:
                m.client.register_model("LLM", llm_definition(tiny_models), persist=True)
            assert err.value.field == "persist"
            names = {r["model_name"] for r in m.client.list_model_registrations("LLM")}
            assert "custom-llama-2" not in names  # nothing half-registered
            assert not list((home / "models" / "LLM").glob(".tmp-*"))  # nothing half-written
            m.client.register_model("LLM", llm_definition(tiny_models), persist=False)  # memory only still works
        finally:
            m.stop()
    finally:
        subprocess.run(["umount", str(home / "models" / "LLM")], capture_output=True)


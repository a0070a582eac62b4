"""Launching models with the real scheduler and workers: lifecycle, placement, failures."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import embedding_definition, llm_definition
from tests.mesh import REPO, Mesh
from zinfer.cli.mesh import detect_gpus
from zinfer.shared.errors import Conflict, InvalidRequest, NotFound, TooLarge, Unavailable, ZinferError

MiB = 2**20


def register(client, models):
    client.register_model("LLM", llm_definition(models))
    client.register_model("embedding", embedding_definition(models))


def worker_free(client, worker_id):
    return next(w["free_memory"] for w in client.scheduler_status()["workers"] if w["worker_id"] == worker_id)


def test_launch_list_terminate_frees_memory(mesh, tiny_models):
    c = mesh.client
    register(c, tiny_models)
    free_before = worker_free(c, "cpu")
    llm = c.launch_model(model_name="custom-llama-2", model_format="pytorch")
    emb = c.launch_model(model_name="custom-bge-base-en", model_type="embedding")
    assert (llm, emb) == ("custom-llama-2", "custom-bge-base-en")
    models = c.list_models()
    assert models[llm]["state"] == "ready" and models[llm]["model_format"] == "pytorch"
    assert models[llm]["quantization"] == "none" and models[llm]["devices"] == ["cpu"]
    assert models[emb]["model_type"] == "embedding" and models[emb]["state"] == "ready"
    used = models[llm]["memory"] + models[emb]["memory"]
    mesh.wait(lambda: worker_free(c, "cpu") == free_before - used or None, timeout=10)
    c.terminate_model(llm)
    c.terminate_model(emb)
    assert c.list_models() == {}
    mesh.wait(lambda: worker_free(c, "cpu") == free_before or None, timeout=10)
    with pytest.raises(NotFound):
        c.terminate_model(llm)


def test_launch_errors(mesh, tiny_models):
    c = mesh.client
    register(c, tiny_models)
    c.launch_model(model_name="custom-llama-2", model_format="ggufv2", quantization="F16", model_uid="g")
    try:
        with pytest.raises(Conflict, match="'g' is already in use"):
            c.launch_model(model_name="custom-llama-2", model_format="pytorch", model_uid="g")
        with pytest.raises(NotFound) as err:
            c.launch_model(model_name="custom-llama-2", model_format="ggufv2", quantization="Q4_K_M")
        assert "pytorch 1B [4-bit, 8-bit, none]" in str(err.value) and "ggufv2 1B [F32, F16]" in str(err.value)
        with pytest.raises(NotFound, match="no LLM model named 'nope'"):
            c.launch_model(model_name="nope")
        # A model with launched instances cannot be unregistered (the registry asks the scheduler).
        with pytest.raises(Conflict, match="launched instances"):
            c.unregister_model("LLM", "custom-llama-2")
    finally:
        c.terminate_model("g")
    c.unregister_model("LLM", "custom-llama-2")


def test_a_failed_load_reports_its_cause_and_leaves_nothing(mesh, tiny_models):
    c = mesh.client
    c.register_model("embedding", embedding_definition(tiny_models, "wrong-dims", dimensions=768))
    with pytest.raises(InvalidRequest, match="384-dimensional.*dimensions=768") as err:  # the worker's own error
        c.launch_model(model_name="wrong-dims", model_type="embedding")
    assert err.value.field == "dimensions"
    view = c.describe_model("wrong-dims")
    assert view["state"] == "failed" and "768" in view["error"]["message"] and view["error"]["code"] == "invalid"
    # Requests to it say why, rather than hanging or saying "unknown".
    from zinfer.shared.errors import InstanceNotReady
    with pytest.raises(InstanceNotReady, match="is failed"):
        c.get_model("wrong-dims").create_embedding("x")
    c.terminate_model("wrong-dims")
    # 4-/8-bit pytorch quantization needs a GPU (bitsandbytes): a clear error on the CPU.
    c.register_model("LLM", llm_definition(tiny_models))
    with pytest.raises(InvalidRequest, match="quantization '4-bit' needs a GPU") as err:
        c.launch_model(model_name="custom-llama-2", model_format="pytorch", quantization="4-bit", model_uid="q4")
    assert err.value.field == "quantization"
    c.terminate_model("q4")
    # A ggmlv3 file that is not GGML v3 (4 bytes): its conversion says what is wrong, naming the file.
    ggml = tiny_models["gguf_dir"] / "x.ggmlv3.q4_0.bin"
    ggml.write_bytes(b"ggml")
    d = llm_definition(tiny_models, "old-ggml")
    d["model_specs"] = [{"model_format": "ggmlv3", "model_size_in_billions": 1, "quantizations": ["q4_0"],
                         "model_id": "x/y", "model_file_name_template": "x.ggmlv3.{quantization}.bin",
                         "model_uri": str(ggml)}]
    c.register_model("LLM", d)
    with pytest.raises(InvalidRequest, match=f"GGML file {ggml} ends inside the header") as err:
        c.launch_model(model_name="old-ggml")
    assert err.value.field == "model_uri"


def test_long_request_does_not_block_other_instances_or_heartbeats(mesh, tiny_models):
    c = mesh.client
    register(c, tiny_models)
    c.register_model("LLM", llm_definition(tiny_models, "long-context", context_length=8192))
    c.launch_model(model_name="long-context", model_format="pytorch", model_uid="slow")
    c.launch_model(model_name="custom-llama-2", model_format="ggufv2", model_uid="fast")
    done = {}

    def long_generation():  # 8,000 tokens: seconds of work for the worker
        r = mesh.new_client(timeout=300).get_model("slow").generate("hello", {"max_tokens": 8000, "temperature": 0})
        done["tokens"] = r["usage"]["completion_tokens"]

    t = threading.Thread(target=long_generation)
    t.start()
    mesh.wait(lambda: c.describe_model("slow")["inflight"] == 1 or None)  # it is running
    fast = c.get_model("fast")
    for _ in range(5):
        assert fast.generate("hello", {"max_tokens": 4, "temperature": 0})["usage"]["completion_tokens"] == 4
        peers = {p["service"]: p for p in c.broker_status()["peers"]}
        assert peers["worker/cpu"]["idle_s"] < mesh.liveness  # its heartbeats keep coming
    assert t.is_alive()  # the other instance answered all five while the long request was still running
    t.join()
    assert done["tokens"] == 8000


def test_sigkill_of_a_worker_fails_its_requests_then_its_instances_come_back(tmp_path, tiny_models):
    m = Mesh(tmp_path / "home", tmp_path).start_all(workers=("cpu:0", "cpu:1"))
    try:
        c = m.client
        register(c, tiny_models)
        c.launch_model(model_name="custom-llama-2", model_format="pytorch", model_uid="doomed", devices=["cpu:0"])
        c.launch_model(model_name="custom-llama-2", model_format="ggufv2", model_uid="survivor",
                       devices=["cpu:1"])
        before = c.get_model("doomed").generate("Once upon a time", {"max_tokens": 12, "temperature": 0})
        result = {}

        def request():
            client = m.new_client(timeout=60)
            start = time.monotonic()
            try:
                client.get_model("doomed").generate("Once upon a time", {"max_tokens": 1900, "temperature": 0})
                result["error"] = None
            except ZinferError as exc:
                result["error"] = exc
            result["after"] = time.monotonic() - start

        t = threading.Thread(target=request)
        t.start()
        m.wait(lambda: m.client.describe_model("doomed")["inflight"] == 1 or None)  # it is being served
        killed_at = time.monotonic()
        m.kill("worker/cpu:0")
        t.join(timeout=15)
        assert isinstance(result["error"], Unavailable), result
        assert time.monotonic() - killed_at < 5
        # Never `ready` while no process holds it: `restarting`, saying why, until its worker is back.
        m.wait(lambda: c.describe_model("doomed")["state"] == "restarting" or None, timeout=10)
        assert "cpu:0" in c.describe_model("doomed")["restart_cause"]
        assert c.describe_model("survivor")["state"] == "ready"
        out = c.get_model("survivor").generate("hi", {"max_tokens": 3, "temperature": 0})
        assert out["usage"]["completion_tokens"] == 3
        # A restarted worker re-registers; its instance is loaded there again without anyone asking.
        m.start_worker("cpu:0")
        m.wait(lambda: c.describe_model("doomed")["state"] == "ready" or None, timeout=90)
        view = c.describe_model("doomed")
        assert view["restarts"] >= 1 and view["devices"] == ["cpu:0"]
        again = c.get_model("doomed").generate("Once upon a time", {"max_tokens": 12, "temperature": 0})
        assert again["choices"][0]["text"] == before["choices"][0]["text"]
        c.terminate_model("doomed")
        uid = c.launch_model(model_name="custom-bge-base-en", model_type="embedding", devices=["cpu:0"])
        assert c.describe_model(uid)["devices"] == ["cpu:0"]
    finally:
        m.stop()


def test_a_native_crash_in_a_worker_leaves_its_stacks_in_the_log(mesh):
    """An engine that segfaults (llama.cpp's AMX kernels did, on this project's VMs) kills its worker; the worker's
    output then holds every thread's Python stack, where the crash happened, not just the broker's "disconnected"."""
    mesh.kill("worker/cpu", signal.SIGSEGV)
    assert mesh.procs["worker/cpu"].returncode == -signal.SIGSEGV
    log = (mesh.log_dir / "worker_cpu.log").read_text()
    assert "Fatal Python error: Segmentation fault" in log
    assert "services/worker/host/service.py" in log and "in serve" in log  # the main thread's loop, where it was
    mesh.wait(lambda: not mesh.client.scheduler_status()["workers"] or None)  # and the mesh knows it is gone


def test_scheduler_restart_rebuilds_its_view_from_the_workers(mesh, tiny_models):
    c = mesh.client
    register(c, tiny_models)
    c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="e1")
    before = c.describe_model("e1")
    mesh.kill("scheduler")
    mesh.start("scheduler", "scheduler")
    mesh.wait(lambda: c.list_models().get("e1", {}).get("state") == "ready" or None, timeout=20)
    after = c.describe_model("e1")
    for key in ("model_name", "model_type", "devices", "state"):
        assert after[key] == before[key], key
    assert after["memory"] > 0  # its process's RSS, read afresh at each report
    c.terminate_model("e1")


@pytest.fixture
def budget_mesh(tmp_path):
    """Two CPU workers with small memory budgets (real processes cpu:0 and cpu:1)."""
    m = Mesh(tmp_path / "home", tmp_path).start_all(workers=("cpu:0", "cpu:1"),
                                                    budgets={"cpu:0": 300, "cpu:1": 200})
    yield m
    m.stop()


def test_placement_with_two_budgeted_cpu_workers(budget_mesh, tiny_models):
    c = budget_mesh.client
    register(c, tiny_models)
    # Replicas spread over distinct workers...
    uid = c.launch_model(model_name="custom-bge-base-en", model_type="embedding", replica=2, model_uid="spread")
    view = c.describe_model(uid)
    assert sorted(view["devices"]) == ["cpu:0", "cpu:1"] and view["replica"] == 2
    # ...and requests for the uid are served by both.
    emb = c.get_model(uid)
    for _ in range(4):
        assert len(emb.create_embedding("hello")["data"][0]["embedding"]) == 384
    c.terminate_model(uid)
    # Pinning is honoured even when the other worker has more room.
    pinned = c.launch_model(model_name="custom-bge-base-en", model_type="embedding", devices=["cpu:1"],
                            model_uid="pinned")
    assert c.describe_model(pinned)["devices"] == ["cpu:1"]
    # A model that fits nowhere is refused with the numbers, and nothing is loaded.
    c.register_model("LLM", {**llm_definition(tiny_models, "big"), "model_specs": [
        {"model_format": "pytorch", "model_size_in_billions": 7, "quantizations": ["none"],
         "model_id": "meta-llama/Llama-2-7b-hf"}]})
    with pytest.raises(TooLarge) as err:
        c.launch_model(model_name="big")
    text = str(err.value)
    assert "cpu:0 needs 32,043 MiB, has" in text and "cpu:1 needs 32,043 MiB" in text
    assert set(c.list_models()) == {"pinned"}
    # Three replicas of a 104 MiB model do not fit in 300 + 200 MiB less what "pinned" holds.
    with pytest.raises(TooLarge, match="replicas placed"):
        c.launch_model(model_name="custom-bge-base-en", model_type="embedding", replica=4, model_uid="many")
    assert set(c.list_models()) == {"pinned"}


def zinfer(mesh, *args):
    return subprocess.run([sys.executable, "-m", "zinfer", *args], capture_output=True, text=True, cwd=REPO,
                          env=mesh.env, timeout=120)


def test_cli_launch_list_terminate(mesh, tiny_models):
    register(mesh.client, tiny_models)
    out = zinfer(mesh, "launch", "--model-name", "custom-llama-2", "--model-format", "ggufv2", "-q", "F16",
                 "-u", "cli-model")
    assert out.returncode == 0, out.stderr
    assert "Model uid: cli-model" in out.stdout
    listed = zinfer(mesh, "list")
    assert "cli-model" in listed.stdout and "ready" in listed.stdout and "F16" in listed.stdout
    out = zinfer(mesh, "launch", "--model-name", "custom-bge-base-en", "--model-type", "embedding", "--no-wait")
    assert out.returncode == 0 and "Model uid: custom-bge-base-en" in out.stdout
    out = zinfer(mesh, "launch", "--model-name", "custom-llama-2", "-u", "cli-model")
    assert out.returncode == 1 and "already in use" in out.stderr and "Traceback" not in out.stderr
    assert zinfer(mesh, "terminate", "--model-uid", "cli-model").returncode == 0
    assert "cli-model" not in zinfer(mesh, "list").stdout


@pytest.mark.skipif(detect_gpus() == 0, reason="needs a GPU worker (no nvidia-smi GPU here)")
def test_launch_on_cuda_frees_memory_after_terminate(tmp_path, tiny_models):
    m = Mesh(tmp_path / "home", tmp_path).start_all(workers=("cuda:0",))
    try:
        c = m.client
        register(c, tiny_models)
        free0 = worker_free(c, "cuda:0")
        uid = c.launch_model(model_name="custom-llama-2", model_format="pytorch", gpu_idx=0)
        assert c.describe_model(uid)["devices"] == ["cuda:0"]
        m.wait(lambda: worker_free(c, "cuda:0") < free0 or None, timeout=10)
        c.terminate_model(uid)
        m.wait(lambda: worker_free(c, "cuda:0") >= free0 - 64 * MiB or None, timeout=10)
    finally:
        m.stop()

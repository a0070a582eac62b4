"""Model lifecycle (issue 24): keep_alive unloads an idle instance and frees its process, the next request loads it
again (one load for many concurrent requests), a registration loads by its name through the gateway for the roles
a setting names, the cap on loaded instances per device unloads the least recently used idle one and never a busy
one, and `zinfer down` then `zinfer up` brings the launched uids back. Real processes throughout; the pure choices
(expiry, which instance makes room, durations) are unit-tested first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from tests.conftest import embedding_definition, llm_definition, served_mesh
from tests.mesh import REPO, free_port, mesh_env, session_preloader
from zinfer.services.scheduler.book import WAKE_GRACE_S, Model, Replica
from zinfer.services.scheduler.lifecycle import expired, room_on
from zinfer.shared import durations, instances, keys
from zinfer.shared.errors import Forbidden, InvalidRequest, Unavailable

GREEDY = {"max_tokens": 12, "temperature": 0}
PROMPT = "What is the largest animal in the world?"


# ---------------------------------------------------------------- pure parts


@pytest.mark.parametrize("value, seconds", [
    ("5m", 300.0), ("1h30m", 5400.0), ("90s", 90.0), ("500ms", 0.5), ("300", 300.0), (2, 2.0), (0, 0.0),
    ("0", 0.0), (-1, None), ("-1", None), ("-5m", None), (1.5, 1.5),
])
def test_keep_alive_takes_ollamas_durations(value, seconds):
    assert durations.parse(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "m5", "", "1d", True, None, [], "nan"])
def test_bad_keep_alive_names_the_field(value):
    with pytest.raises(InvalidRequest) as info:
        durations.parse(value)
    assert info.value.field == "keep_alive"


def model(uid: str, worker: str = "cpu", active: float = 0.0, busy: bool = False, keep_alive: float | None = 10.0,
          state: str = "ready") -> Model:
    status = instances.ReplicaStatus(state=state, inflight=1 if busy else 0, last_active=active)
    return Model(uid=uid, info=instances.InstanceInfo(model_name=uid, model_type="LLM"), keep_alive=keep_alive,
                 replicas=[Replica(worker_id=worker, index=0, status=status)])


def test_an_instance_expires_when_idle_for_its_keep_alive_only():
    assert expired(model("a", active=100.0), now=110.0)
    assert not expired(model("a", active=100.0), now=109.9)
    assert not expired(model("a", active=100.0, busy=True), now=1e9)  # never while it has work
    assert not expired(model("a", active=100.0, keep_alive=None), now=1e9)  # for ever
    assert expired(model("a", active=100.0, keep_alive=0.0), now=100.0)  # right after its reply
    assert not expired(model("a", active=100.0, state="launching"), now=1e9)


def test_a_woken_instance_waits_for_the_request_that_woke_it():
    """keep_alive 0, loaded on request at 100: not unloaded again before a request reaches it (within the grace),
    then at once after that request's reply."""
    woken = model("a", active=90.0, keep_alive=0.0)
    woken.woken_at = woken.last_active = 100.0
    assert not expired(woken, now=101.0)
    assert expired(woken, now=100.0 + WAKE_GRACE_S)  # nobody came: unloaded after the grace
    woken.replicas[0].status.last_active = 102.0  # the request arrived (and was answered: idle again)
    assert expired(woken, now=102.0)
    assert not expired(model("b", active=100.0, keep_alive=300.0), now=100.0 + WAKE_GRACE_S)  # longer keep_alive


def test_the_cap_picks_the_least_recently_used_idle_instance_and_never_a_busy_one():
    models = [model("old-busy", active=1.0, busy=True), model("mid", active=5.0), model("new", active=9.0),
              model("elsewhere", worker="cuda:0", active=0.0)]
    assert room_on("cpu", models, cap=0, coming="x") is None  # no cap
    assert room_on("cpu", models, cap=4, coming="x") is None  # room left
    assert room_on("cpu", models, cap=3, coming="x").uid == "mid"  # LRU of the idle ones on this worker
    assert room_on("cpu", models, cap=2, coming="mid").uid == "new"  # never the one coming
    with pytest.raises(Unavailable, match="max_loaded_per_device 1"):
        room_on("cpu", [model("a", busy=True)], cap=1, coming="x")


# ---------------------------------------------------------------- a served mesh


@pytest.fixture(scope="module")
def life(tmp_path_factory, tiny_models):
    with served_mesh(tmp_path_factory, tiny_models, "lifecycle", [], gateway=True) as m:
        m.user_api_key = keys.api_key_of(keys.read_key_file(m.user_key))
        yield m


def test_keep_alive_unloads_an_idle_instance_and_its_next_request_loads_it_again(life):
    c = life.client
    c.launch_model(model_name="custom-llama-2", model_format="ggufv2", quantization="F32", model_uid="ka2",
                   keep_alive="2s")
    first = c.get_model("ka2").generate(PROMPT, GREEDY)["choices"][0]["text"]
    view = c.describe_model("ka2")
    pid, loads = view["pids"][0], view["loads"]
    assert view["keep_alive"] == 2.0 and view["expires_at"] is not None and psutil.pid_exists(pid)
    unloaded = life.wait(lambda: (v := c.describe_model("ka2"))["state"] == "idle-unloaded" and v, timeout=30)
    assert unloaded["memory"] == 0 and unloaded["pids"] == [0] and unloaded["unloaded_at"] > 0
    life.wait(lambda: not psutil.pid_exists(pid), timeout=30)  # its process is gone, and its memory with it
    assert "ka2" in c.list_models()  # still launched
    again = c.get_model("ka2").generate(PROMPT, GREEDY)["choices"][0]["text"]
    assert again == first
    view = c.describe_model("ka2")
    assert view["state"] == "ready" and view["loads"] == loads + 1 and view["pids"][0] != pid
    c.terminate_model("ka2")


def test_keep_alive_zero_unloads_after_the_reply_and_minus_one_never(life):
    c = life.client
    c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="ka0", keep_alive=0)
    c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="ka-1", keep_alive=-1)
    for uid in ("ka0", "ka-1"):
        assert len(c.get_model(uid).create_embedding("whales")["data"][0]["embedding"]) == 384
    life.wait(lambda: c.describe_model("ka0")["state"] == "idle-unloaded", timeout=30)
    life.wait(lambda: c.describe_model("ka0")["unloaded_at"] + 2 < time.time(), timeout=10)  # expiry has run on
    forever = c.describe_model("ka-1")
    assert forever["state"] == "ready" and forever["keep_alive"] is None and forever["expires_at"] is None
    # the REST list says so too, and `zinfer list` shows when each expires
    env = dict(os.environ, ZINFER_ENDPOINT=life.endpoint, ZINFER_HOME=str(life.home))
    listed = subprocess.run([sys.executable, "-m", "zinfer", "list"], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=120)
    assert listed.returncode == 0 and "Expires" in listed.stdout and "unloaded" in listed.stdout
    assert "never" in listed.stdout
    c.terminate_model("ka0")
    c.terminate_model("ka-1")


def test_sixteen_concurrent_requests_to_an_unloaded_instance_cause_one_load(life):
    c = life.client
    c.launch_model(model_name="custom-llama-2", model_format="ggufv2", quantization="F32", model_uid="crowd",
                   keep_alive="1s")
    expected = c.get_model("crowd").generate(PROMPT, GREEDY)["choices"][0]["text"]
    life.wait(lambda: c.describe_model("crowd")["state"] == "idle-unloaded", timeout=30)
    loads = c.describe_model("crowd")["loads"]
    clients = [life.new_client(timeout=120) for _ in range(16)]  # one connection each
    try:
        with ThreadPoolExecutor(16) as pool:
            texts = list(pool.map(lambda cl: cl.get_model("crowd").generate(PROMPT, GREEDY)["choices"][0]["text"],
                                  clients))
    finally:
        for cl in clients:
            cl.close()
    assert texts == [expected] * 16
    assert c.describe_model("crowd")["loads"] == loads + 1  # one load for all sixteen
    c.terminate_model("crowd")


def test_a_registration_loads_by_its_name_through_the_gateway_for_admins_only(life):
    url = f"{life.gateway_url}/v1/embeddings"
    body = {"model": "custom-bge-base-en", "input": "whales"}
    user = requests.post(url, json=body, headers={"Authorization": f"Bearer {life.user_api_key}"}, timeout=120)
    assert user.status_code == 403 and "load_on_request_roles" in user.text
    assert "custom-bge-base-en" not in life.client.list_models()
    admin = requests.post(url, json={**body, "keep_alive": "10m"}, timeout=300,
                          headers={"Authorization": f"Bearer {life.admin_api_key}"})
    assert admin.status_code == 200, admin.text
    assert len(admin.json()["data"][0]["embedding"]) == 384
    view = life.client.describe_model("custom-bge-base-en")  # launched under its name, with the request's keep_alive
    assert view["state"] == "ready" and view["keep_alive"] == 600.0
    # a user's request to the running instance is served; its own keep_alive is refused (keep_alive_roles)
    ok = requests.post(url, json=body, headers={"Authorization": f"Bearer {life.user_api_key}"}, timeout=60)
    assert ok.status_code == 200
    refused = requests.post(url, json={**body, "keep_alive": -1}, timeout=60,
                            headers={"Authorization": f"Bearer {life.user_api_key}"})
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "keep_alive"
    missing = requests.post(url, json={**body, "model": "no-such-model"}, timeout=60,
                            headers={"Authorization": f"Bearer {life.admin_api_key}"})
    assert missing.status_code == 404
    life.client.terminate_model("custom-bge-base-en")


def test_registration_json_from_the_cli_and_the_client(life, tiny_models):
    env = dict(os.environ, ZINFER_ENDPOINT=life.endpoint, ZINFER_HOME=str(life.home))
    out = subprocess.run([sys.executable, "-m", "zinfer", "registration", "custom-bge-base-en"], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == life.client.get_model_registration("embedding", "custom-bge-base-en") \
        == embedding_definition(tiny_models)
    missing = subprocess.run([sys.executable, "-m", "zinfer", "registration", "nope"], capture_output=True,
                             text=True, env=env, cwd=REPO, timeout=120)
    assert missing.returncode != 0 and "model_name" in missing.stderr


@pytest.fixture(scope="module")
def capped(tmp_path_factory, tiny_models):
    """A mesh whose CPU holds at most two loaded instances, and whose users may load by name."""
    os.environ["ZINFER_MAX_LOADED_PER_DEVICE"] = "2"
    os.environ["ZINFER_LOAD_ON_REQUEST_ROLES"] = "admin,user"
    try:
        with served_mesh(tmp_path_factory, tiny_models, "capped", [], gateway=True) as m:
            m.user_api_key = keys.api_key_of(keys.read_key_file(m.user_key))
            yield m
    finally:
        del os.environ["ZINFER_MAX_LOADED_PER_DEVICE"], os.environ["ZINFER_LOAD_ON_REQUEST_ROLES"]


def test_the_cap_unloads_the_least_recently_used_idle_instance_never_a_busy_one(capped):
    c = capped.client
    c.launch_model(model_name="long-context", model_format="pytorch", model_uid="busy")  # slow: stays busy
    c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="idle")
    c.get_model("idle").create_embedding("recent")  # busy is the least recently used, but it will have work
    done = threading.Event()

    def long_generation():
        client = capped.new_client(timeout=300)
        try:  # 8,000 tokens past every end token: ten seconds and more here
            client.get_model("busy").generate("Once upon a time", {"max_tokens": 8000, "ignore_eos": True,
                                                                   "temperature": 0})
        except Exception:  # cancelled by the terminate below
            pass
        finally:
            client.close()
            done.set()

    threading.Thread(target=long_generation, daemon=True).start()
    capped.wait(lambda: c.describe_model("busy")["inflight"] == 1 or None, timeout=60)
    c.launch_model(model_name="custom-llama-2", model_format="ggufv2", quantization="F32", model_uid="third")
    assert c.describe_model("idle")["state"] == "idle-unloaded"  # made room: the LRU idle one
    assert c.describe_model("busy")["state"] == "ready"  # less recently used, but it had work
    # a request to the unloaded one loads it again: third is idle now, so third makes room (busy has work)
    assert len(c.get_model("idle").create_embedding("back")["data"]) == 1
    assert c.describe_model("third")["state"] == "idle-unloaded"
    assert c.describe_model("busy")["state"] == "ready"
    assert not done.is_set()  # busy had work the whole time
    c.terminate_model("busy")  # cancels the long generation
    assert done.wait(60)
    for uid in ("idle", "third"):
        c.terminate_model(uid)


def test_a_user_loads_by_name_where_the_setting_allows_it(capped):
    headers = {"Authorization": f"Bearer {capped.user_api_key}"}
    r = requests.post(f"{capped.gateway_url}/v1/rerank", timeout=300, headers=headers,
                      json={"model": "custom-reranker", "query": "q", "documents": ["a", "b"]})
    assert r.status_code == 200, r.text
    assert capped.client.describe_model("custom-reranker")["state"] == "ready"
    r = requests.post(f"{capped.gateway_url}/v1/embeddings", timeout=60, headers=headers,
                      json={"model": "no-such-registration", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"  # nothing by that name: no load
    capped.client.terminate_model("custom-reranker")


# ---------------------------------------------------------------- zinfer down, zinfer up


def zinfer(home, env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "zinfer", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


def test_zinfer_down_then_up_brings_the_launched_uids_back(tmp_path, tiny_models):
    """Its `up`s take the test session's preloader (the `preloader` setting naming a socket): they start none of
    their own, and their workers' fork servers come from it."""
    home = tmp_path / "home"
    env = mesh_env(f"tcp://127.0.0.1:{free_port()}", home)
    env.update(ZINFER_GATEWAY_PORT=str(free_port()), ZINFER_PRELOADER=session_preloader(env))
    up = subprocess.Popen([sys.executable, "-m", "zinfer", "up", "--no-http"], env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from zinfer.shared.client import Client

        def client():
            return Client(env["ZINFER_ENDPOINT"], timeout=30, key=keys.client_key_path(home, "admin"))

        c = wait_for(lambda: (cl := client()).scheduler_status()["workers"] and cl, 120)
        c.register_model("LLM", llm_definition(tiny_models), persist=True)
        c.register_model("embedding", embedding_definition(tiny_models), persist=True)
        c.launch_model(model_name="custom-llama-2", model_format="ggufv2", quantization="F32", model_uid="kept")
        c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="lazy", restore=False)
        before = c.get_model("kept").generate(PROMPT, GREEDY)["choices"][0]["text"]
        c.close()
        assert zinfer(home, env, "down").returncode == 0
        up.wait(60)
        up = subprocess.Popen([sys.executable, "-m", "zinfer", "up", "--no-http"], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c = wait_for(lambda: (cl := client()).scheduler_status()["workers"] and cl, 120)
        back = wait_for(lambda: c.describe_model("kept")["state"] == "ready" and c.list_models(), 180)
        assert set(back) == {"kept", "lazy"}
        assert back["lazy"]["state"] == "idle-unloaded"  # restore=False: back, not loaded
        assert c.get_model("kept").generate(PROMPT, GREEDY)["choices"][0]["text"] == before
        assert len(c.get_model("lazy").create_embedding("x")["data"]) == 1  # loads on its first request
        c.close()
        assert not (home / "run" / "preloader.sock").exists()  # `up` started no preloader of its own
        log = [json.loads(line) for line in (home / "logs" / "worker-cpu.log").read_text().splitlines()]
        assert {e["origin"] for e in log if e["event"] == "fork_server"} == {"from the preloader"}
    finally:
        zinfer(home, env, "down")
        up.wait(60)


def wait_for(probe, timeout: float):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            got = probe()
            if got:
                return got
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"not met in {timeout}s (last error: {last})")


def test_forbidden_is_the_error_type_of_a_refused_load(life):
    from zinfer.shared import protocol as p

    user = life.new_client(key=life.user_key)
    try:
        with pytest.raises(Forbidden) as info:
            user.call(p.SCHEDULER, p.WakeModel(model_name="custom-llama-2"))
        assert info.value.field == "model"
    finally:
        user.close()


def test_the_broker_answers_at_once_for_a_uid_whose_instance_left(life):
    """Not after unroutable_grace (kept for services that re-register after a broker restart): the message says
    the instance left, which only the immediate answer gives."""
    from zinfer.shared import protocol as p
    from zinfer.shared.errors import NoRoute

    c = life.client
    c.launch_model(model_name="custom-bge-base-en", model_type="embedding", model_uid="gone-soon")
    c.terminate_model("gone-soon")
    with pytest.raises(NoRoute, match="unloaded or terminated"):
        c.call_with_buffers(p.model_target("gone-soon").encode(), p.Embed(model_uid="gone-soon", input=["x"]))
    with pytest.raises(NoRoute, match="no such service or model uid"):  # never served: it waits its grace
        c.call_with_buffers(p.model_target("never-was").encode(), p.Embed(model_uid="never-was", input=["x"]))

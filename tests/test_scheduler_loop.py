"""The scheduler's loop (services/scheduler/core.py) driven by scripted events, without a mesh: the state
machine's table walked, every order of two of launch / report / worker death / wake / terminate with the
invariants checked after each step, and no scheduler state written off the loop thread."""

from __future__ import annotations

import itertools
import threading

import pytest

from zinfer.services.scheduler import events as ev
from zinfer.services.scheduler.book import LaunchBook, Model, Replica, WorkerState
from zinfer.services.scheduler.core import Core
from zinfer.services.scheduler.machine import LOADING, TRANSITIONS, Event, IllegalMove, Phase, next_phase
from zinfer.shared import instances
from zinfer.shared import protocol as p
from zinfer.shared.config import load_settings
from zinfer.shared.errors import RequestTimeout, Unavailable, ZinferError
from zinfer.shared.models import EmbeddingFamily

pytestmark = pytest.mark.unit

FAMILY = EmbeddingFamily(model_name="emb", dimensions=8, max_tokens=16, language=["en"], model_id="x/emb")


# ---------------------------------------------------------------- the table


def test_the_table_allows_exactly_its_moves_and_every_phase_is_reachable():
    for phase, event in itertools.product(Phase, Event):
        if (phase, event) in TRANSITIONS:
            assert next_phase(phase, event) is TRANSITIONS[(phase, event)]
        else:
            with pytest.raises(IllegalMove, match=f"{phase.value}.*{event.value}"):
                next_phase(phase, event)
    reached, frontier = {Phase.LAUNCHING, Phase.RECORDED}, [Phase.LAUNCHING, Phase.RECORDED]
    while frontier:
        phase = frontier.pop()
        for (start, _event), end in TRANSITIONS.items():
            if start is phase and end not in reached:
                reached.add(end)
                frontier.append(end)
    assert reached == set(Phase)
    for phase in Phase:  # every phase can end: a terminate is always allowed
        assert next_phase(phase, Event.TERMINATE) is Phase.TERMINATING
    for phase in (Phase.LAUNCHING, Phase.WAKING, Phase.RESTORING):  # a report never overrides a load on its way
        assert next_phase(phase, Event.HELD) is phase


def test_a_failed_terminate_puts_each_replica_back_where_it_was():
    r = Replica(worker_id="cpu", index=0, phase=Phase.UNLOADED)
    r.move(Event.TERMINATE)
    r.move(Event.TERMINATE)  # a second terminate meanwhile
    r.move(Event.TERMINATE_FAILED)
    assert r.phase is Phase.UNLOADED


# ---------------------------------------------------------------- a scripted worker and loop


class Script:
    """The loop's calls to workers, answered by a script: one worker `cpu` that holds what it was told to load
    (while it is alive), and a clock the script moves."""

    def __init__(self, tmp_path):
        self.settings = load_settings(home=str(tmp_path / "home"), heartbeat_interval=1000.0,
                                      worker_return_s=100000.0, max_loaded_per_device=0)
        self.now = 1000.0
        self.core = Core(self.settings, effects=self)
        self.core.clock = lambda: self.now
        self.core.started = self.now
        self.pending: list = []
        self.held: dict[tuple[str, int], p.LoadInstance] = {}
        self.alive = True
        self.pid = 1
        self.writes: list[tuple[str, int]] = []
        self.bad_sends: list[str] = []

    # Effects, called by the loop
    def call(self, worker_id, msg, timeout, then=None):
        if isinstance(msg, p.LoadInstance):
            _, r = self.core.launches.replica(msg.model_uid, msg.incarnation, msg.replica)
            if r is None or r.phase not in LOADING:
                self.bad_sends.append(f"a load for {msg.model_uid} in phase {r and r.phase}")
        self.pending.append((worker_id, msg, then))

    def ask_all(self, workers, msg, timeout, then):
        self.pending.append(("*", msg, then))

    # the script
    def deliver(self) -> None:
        """The worker does what it was asked, and each outcome goes back to the loop."""
        while self.pending:
            worker_id, msg, then = self.pending.pop(0)
            error = None if self.alive else Unavailable("worker cpu is not running")
            if isinstance(msg, p.LoadInstance) and error is None:
                self.held[(msg.model_uid, msg.replica)] = msg
            elif isinstance(msg, p.UnloadInstance) and error is None:
                self.held = {k: v for k, v in self.held.items()
                             if not (k[0] == msg.model_uid and v.incarnation == msg.incarnation)}
            elif isinstance(msg, p.ProbeFiles):
                found = {"cpu": p.FileProbe(ok=True, memory=10)} if self.alive else {}
                self.core.post(then(found))
                continue
            if then is not None:
                event = then(error)
                if event is not None:
                    self.core.post(event)
        self.core.ask(ev.Sync())

    def report(self) -> None:
        if not self.alive:
            self.alive, self.pid = True, self.pid + 1  # a report is the worker back, restarted: it holds nothing
            self.held = {}
        device = instances.DeviceInfo(worker_id="cpu", host="h", device="cpu", total_memory=1000, free_memory=1000,
                                      pid=self.pid)
        held = [instances.InstanceReport(model_uid=uid, replica=index, incarnation=load.incarnation,
                                         info=instances.info_of(load),
                                         status=instances.ReplicaStatus(state="ready", progress=1.0))
                for (uid, index), load in self.held.items()]
        self.core.post(ev.Report(p.WorkerReport(device=device, instances=held)))
        self.core.ask(ev.Sync())

    def tick(self, seconds: float = 0.0) -> None:
        self.now += seconds
        self.core.ask(ev.Tick())

    def place(self, uid: str, keep_alive: float | None = None) -> None:
        """A launch placed on `cpu`; its load stays pending until deliver()."""
        base = p.LoadInstance(model_uid=uid, model_type="embedding", embedding=FAMILY, incarnation=int(self.now * 1e6))
        self.core.ask(ev.Place(launch=p.LaunchModel(model_name="emb", model_type="embedding", model_uid=uid),
                               base=base, found={"cpu": p.FileProbe(ok=True, memory=10)}, keep_alive=keep_alive))

    def launch(self, uid: str, keep_alive: float | None = None) -> None:
        try:
            self.place(uid, keep_alive)
        except ZinferError:
            pass  # in use, or no worker: typed, and nothing changed
        self.deliver()

    def terminate(self, uid: str) -> None:
        try:
            incarnation, _holding, _running = self.core.ask(ev.Terminate(uid))
        except ZinferError:
            return
        self.held = {k: v for k, v in self.held.items() if k[0] != uid}
        self.core.ask(ev.Terminated(uid, incarnation))

    def wake(self, uid: str) -> None:
        try:
            self.core.ask(ev.Wake(uid))
        except ZinferError:
            pass
        self.deliver()

    def kill_worker(self) -> None:
        self.alive = False
        self.tick(self.settings.liveness_s + 1)
        self.deliver()


def check(script: Script, step: str) -> None:
    """The invariants, read while the loop waits (every step ends with a Sync)."""
    core = script.core
    assert not script.bad_sends, (step, script.bad_sends)
    for model in core.models.values():
        phases = {r.phase for r in model.replicas}
        assert (Phase.UNLOADED not in phases) or phases == {Phase.UNLOADED}, (step, model.uid, phases)
        assert Phase.TERMINATING not in phases, (step, model.uid, "a finished terminate leaves nothing behind")
        for r in model.replicas:
            assert (r.phase is Phase.UNLOADED) == (r.state == "idle-unloaded"), (step, model.uid, r.phase, r.state)
            if r.phase is Phase.FAILED:
                assert r.state == "failed" and r.status.error is not None, (step, model.uid)
            if r.phase is Phase.READY and script.alive and not script.pending:
                assert (model.uid, r.index) in script.held, (step, model.uid, "ready but not held")
        assert model.state == core.snapshot.views[model.uid].state, (step, "the published view is current")
    assert set(core.snapshot.views) == set(core.models)
    for state in core.workers.values():
        for uid, index in state.reserved:
            assert uid in core.models and any(r.index == index for r in core.models[uid].replicas), (step, uid)
    assert sorted(r.uid for r in core.book.load()) == sorted(core.models), (step, "the launch book is current")


ACTIONS = {
    "launch": lambda s: s.launch("m"),
    "report": lambda s: (s.report(), s.deliver()),
    "worker death": lambda s: s.kill_worker(),
    "wake": lambda s: s.wake("idle"),
    "terminate": lambda s: s.terminate("m"),
}


@pytest.mark.parametrize("first, second", list(itertools.product(ACTIONS, repeat=2)),
                         ids=lambda name: name.replace(" ", "-"))
def test_every_order_of_two_keeps_the_invariants(tmp_path, first, second):
    script = Script(tmp_path)
    core = script.core
    core.start()
    script.report()
    script.launch("idle", keep_alive=0.0)  # ready, then idle for its keep_alive: unloaded at the next tick
    script.report()
    script.tick()
    script.deliver()
    assert core.models["idle"].unloaded and ("idle", 0) not in script.held
    check(script, "start")
    for step in (first, second):
        ACTIONS[step](script)
        check(script, step)
    # Then the worker reports (it is back, if it died) and the loop settles: what is desired is held again.
    for _ in range(3):
        script.report()
        script.tick()
        script.deliver()
    check(script, "settled")
    for model in core.models.values():
        assert {r.phase for r in model.replicas} <= {Phase.READY, Phase.UNLOADED}, (model.uid, model.replicas)
    core.running = False
    core.post(ev.Sync())


def test_no_scheduler_state_is_written_off_the_loop(tmp_path, monkeypatch):
    """Every write to a model, a replica, a worker's state, the models and workers tables and the launch book
    comes from the loop thread, while the script posts from this thread and another."""
    script = Script(tmp_path)
    core = script.core
    writers: set[int] = set()
    started = threading.Event()

    def watch(cls):
        original = cls.__setattr__

        def setattr_(self, name, value):
            if started.is_set():
                writers.add(threading.get_ident())
            original(self, name, value)
        monkeypatch.setattr(cls, "__setattr__", setattr_)

    for cls in (Model, Replica, WorkerState):
        watch(cls)

    class Watched(dict):
        def __setitem__(self, key, value):
            writers.add(threading.get_ident())
            super().__setitem__(key, value)

        def __delitem__(self, key):
            writers.add(threading.get_ident())
            super().__delitem__(key)

    core.models, core.workers = Watched(core.models), Watched(core.workers)
    save = core.book.save
    monkeypatch.setattr(core.book, "save", lambda records: (writers.add(threading.get_ident()), save(records)))
    core.start()
    started.set()
    other = threading.Thread(target=lambda: [script.report() for _ in range(5)])
    other.start()
    script.report()
    script.launch("a", keep_alive=0.0)
    script.launch("b")
    other.join()
    script.report()
    script.tick()
    script.deliver()
    script.wake("a")
    script.kill_worker()
    script.report()
    script.tick()
    script.deliver()
    script.terminate("b")
    script.terminate("a")
    core.ask(ev.Sync())
    assert writers == {core.owner}, "scheduler state was written off its loop thread"
    assert not core.models


def test_a_launch_whose_worker_restarts_while_loading_is_loaded_again_and_the_lost_answer_ignored(tmp_path):
    """The worker's process is replaced while a launch's LoadInstance is on its way (its answer may never come, or
    come late as an error): the replica is loaded again on the new process, and the old load's answer changes
    nothing (a 10-minute chaos soak once left two launches `launching` for a minute this way)."""
    script = Script(tmp_path)
    core = script.core
    core.start()
    script.report()
    script.place("m")
    (lost,) = script.pending  # the launch's load, never answered by the old process
    script.pending.clear()
    script.pid += 1  # the worker restarted: it holds nothing
    script.report()
    assert core.models["m"].replicas[0].phase is Phase.RESTORING
    assert core.snapshot.views["m"].state == "restarting"
    script.deliver()  # the new process loads it
    core.post(lost[2](Unavailable("worker cpu left before answering")))  # the old load's late answer
    core.ask(ev.Sync())
    r = core.models["m"].replicas[0]
    assert r.phase is Phase.READY and r.state == "ready" and ("m", 0) in script.held


def test_a_worker_that_says_ready_settles_a_launch_whose_answer_was_lost(tmp_path):
    """The LoadInstance's reply is lost (the broker restarted meanwhile) but the worker reports the replica ready:
    the launch is ready, and the reply's timeout, when it comes, does not fail it."""
    script = Script(tmp_path)
    core = script.core
    core.start()
    script.report()
    script.place("m")
    (_worker, load, then) = script.pending.pop()
    script.held[("m", 0)] = load  # the worker loaded it; its reply went to a broker that is gone
    script.report()
    assert core.models["m"].replicas[0].phase is Phase.READY
    core.post(then(RequestTimeout("no answer in 600 s")))
    core.ask(ev.Sync())
    assert core.models["m"].replicas[0].phase is Phase.READY and core.snapshot.views["m"].state == "ready"


def test_adapters_loaded_at_run_time_become_part_of_the_launch_on_the_loop(tmp_path):
    """A run-time LoRA load is recorded in every replica's load (what a restore or a move sends) and in the book;
    an unload takes it out; only a ready LLM takes them."""
    from zinfer.shared.models import LLMFamily, LLMSpec
    from zinfer.shared.payloads import LoraAdapter

    script = Script(tmp_path)
    core = script.core
    core.start()
    script.report()
    spec = LLMSpec(model_format="pytorch", model_size_in_billions=1, quantizations=["none"], model_id="x/llm")
    family = LLMFamily(model_name="llm", model_lang=["en"], model_ability=["generate"], model_specs=[spec])
    base = p.LoadInstance(model_uid="l", model_type="LLM", llm=family, spec=spec, quantization="none",
                          incarnation=7)
    core.ask(ev.Place(launch=p.LaunchModel(model_name="llm", model_uid="l"), base=base,
                      found={"cpu": p.FileProbe(ok=True, memory=10)}, keep_alive=None))
    with pytest.raises(ZinferError):  # still launching
        core.ask(ev.Adapters("l"))
    script.deliver()
    script.report()
    targets, loras = core.ask(ev.Adapters("l"))
    assert targets == [("cpu", 0)] and loras == []
    lora = LoraAdapter(lora_name="A", local_path="/a")
    core.ask(ev.Adapters("l", add=lora))
    assert core.models["l"].replicas[0].load.loras == [lora] and core.snapshot.views["l"].info.loras == [lora]
    (record,) = LaunchBook(script.settings.home_path).load()  # written by the loop, in order
    assert record.loads[0].loras == [lora]
    core.ask(ev.Adapters("l", drop="A"))
    assert core.models["l"].replicas[0].load.loras == []
    script.place("e")
    script.deliver()
    script.report()
    with pytest.raises(ZinferError):  # an embedding model takes no adapters
        core.ask(ev.Adapters("e"))

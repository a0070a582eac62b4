"""Races found by reading (issue 32), each reproduced by forcing the interleaving that breaks it: a scheduled
thread switch inside a listing, a reconnect between a call's read of its table and its insert, a connection
evicted under another caller's request."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

from zinfer.shared import keys, wire
from zinfer.shared import protocol as p
from zinfer.shared.config import load_settings


def test_listing_registrations_while_others_register_is_never_torn(tmp_path):
    """`list` answers on the registry's I/O thread without the lock while `register` runs on a pool thread."""
    from zinfer.services.registry.service import Registry

    registry = Registry(load_settings(home=str(tmp_path / "home")))
    done, errors = threading.Event(), []

    def register_many():
        try:
            for i in range(300):
                registry.register_model(p.RegisterModel(model_type="embedding", model=(
                    f'{{"model_name": "e{i}", "dimensions": 8, "max_tokens": 8, "language": ["en"], '
                    f'"model_id": "org/e{i}"}}')), None)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: inside every listing
    try:
        writer = threading.Thread(target=register_many)
        writer.start()
        listings = 0
        while not done.is_set():
            registry.list_registrations(p.ListRegistrations(model_type="embedding"), None)
            listings += 1
        writer.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors
    names = {i.model_name for i in registry.list_registrations(p.ListRegistrations(model_type="embedding"), None).items}
    assert {f"e{i}" for i in range(300)} <= names and listings > 0


def test_a_call_registered_while_the_broker_is_lost_still_gets_its_reply(tmp_path):
    """ServiceRuntime._fail_calls (the I/O thread, on a reconnect) between a call's read of its table and its
    insert: the call must land where its reply is looked up, not wait out its timeout."""
    from zinfer.shared.transport import ServiceRuntime

    home = tmp_path / "home"
    keys.init_keys(home)
    runtime = ServiceRuntime("race-test", load_settings(home=str(home)), {})

    seen: list[bytes] = []

    class Interleaved(dict):
        def __setitem__(self, key, value):
            runtime._fail_calls("lost the broker")  # the reconnect, just before the insert
            super().__setitem__(key, value)
            seen.append(key)

    runtime._calls = Interleaved()
    result: list = []
    caller = threading.Thread(target=lambda: result.append(_call(runtime)))
    caller.start()
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.005)
    (req_id,) = seen
    runtime._on_frames([wire.REPLY, req_id, p.encode(p.Pong(payload=b"answer"))])  # the reply arrives
    caller.join(10)
    runtime.pool.shutdown(wait=False)
    assert result and isinstance(result[0], p.Pong) and result[0].payload == b"answer", result


def _call(runtime):
    try:
        return runtime.call("somewhere", p.Ping(), timeout=3)
    except Exception as exc:  # noqa: BLE001 - the test reads it
        return exc


def test_the_gateway_never_closes_a_connection_under_its_requests(tmp_path):
    """Bus.connection keeps at most max_connections; the one it closes must have nothing in flight."""
    from zinfer.services.gateway.bus import Bus

    home = tmp_path / "home"
    keys.init_keys(home)
    settings = load_settings(home=str(home), endpoint="tcp://127.0.0.1:9")  # nothing listens: no replies

    def key(name: str) -> keys.KeyFile:
        return keys.create_client_key(home, name, "user")

    async def scenario():
        bus = Bus(settings, max_connections=1)
        busy = bus.connection(key("a"))
        waiting = asyncio.get_running_loop().create_future()
        busy.waiters[b"req-1"] = waiting  # a request of caller a, in flight
        bus.connection(key("b"))
        kept = busy.sock.closed is False and not waiting.done()
        busy.waiters.clear()  # a's request answered
        bus.connection(key("c"))
        evicted = busy.sock.closed and len(bus.connections) == 1
        bus.close()
        return kept, evicted

    kept, evicted = asyncio.run(scenario())
    assert kept, "the busy connection was closed under its request"
    assert evicted, "idle connections beyond the cap stay open"


def test_metrics_show_every_state_an_instance_can_be_in():
    """The gateway's instance-state gauge once listed a hand copy of four states: an instance restarting or
    unloaded for its keep_alive showed no state at all."""
    import typing

    from zinfer.services.gateway.metrics import Metrics
    from zinfer.shared import instances

    states = typing.get_args(instances.InstanceState)
    views = [instances.InstanceView(model_uid=f"m-{state}", state=state, info=instances.InstanceInfo(
        model_name="m", model_type="LLM", model_format="pytorch", quantization="none", model_ability=["chat"],
        context_length=8)) for state in states]
    text = Metrics().render(views).decode()
    for state in states:
        assert f'zinfer_instance_state{{model_name="m",model_type="LLM",model_uid="m-{state}",state="{state}"}} 1.0' \
            in text, state

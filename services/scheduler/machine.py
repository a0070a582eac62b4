"""A replica's life in the scheduler, as an explicit state machine: its phases, the events that move it, and the
table of every allowed move. Only the scheduler's loop thread moves a replica (services/scheduler/core.py);
a move the table does not allow is a bug, raised as IllegalMove.

    launch ──▶ LAUNCHING ──loaded──▶ READY ◀──held── RECORDED (from the launch book, before its worker reports)
                  │ failed            │  ▲  missing / worker_lost        │ not_restored
                  ▼                   ▼  │held/loaded                     ▼
                FAILED ◀──failed── LOST ─restore▶ RESTORING      UNLOADED ──wake──▶ WAKING ──loaded──▶ READY
                                    │ ▲               ▲           ▲  ▲ idle / cap       │ wake_failed
                                    move│ move_failed  │moved      │  └─────────────────┘
                                    ▼   │              │           └── READY (unload)
                                    MOVING ────────────┘
    any phase ──terminate──▶ TERMINATING ──terminate_failed──▶ back where it was
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    RECORDED = "recorded"  # read from the launch book at start; no worker has reported it yet
    LAUNCHING = "launching"  # its launch's LoadInstance is on its way
    READY = "ready"  # its worker holds it (and says how it is doing)
    LOST = "lost"  # desired but not held: loaded again on its worker, or moved when the worker stays away
    MOVING = "moving"  # the workers are asked which one can take it instead
    RESTORING = "restoring"  # a LoadInstance to bring it back is on its way
    UNLOADED = "unloaded"  # idle-unloaded: launched, its memory freed; a request loads it again
    WAKING = "waking"  # loading again on request
    FAILED = "failed"  # will not load (its launch failed, or its worker gave up on it)
    TERMINATING = "terminating"  # being unloaded for good


class Event(enum.Enum):
    LOADED = "loaded"  # a LoadInstance succeeded
    FAILED = "failed"  # a load failed for good, or the worker reports it failed
    HELD = "held"  # its worker reports holding it
    MISSING = "missing"  # its worker reports without it
    WORKER_LOST = "worker_lost"  # its worker stopped reporting
    NOT_RESTORED = "not_restored"  # from the launch book, not to be loaded again (restore is off)
    LOAD_LOST = "load_lost"  # its worker restarted or stopped reporting while a load was on its way: no answer comes
    RESTORE = "restore"  # the reconciler loads it on its worker
    RETRY_LATER = "retry_later"  # a restore the worker could not do now
    MOVE = "move"  # the reconciler looks for another worker
    MOVED = "moved"  # another worker will take it
    MOVE_FAILED = "move_failed"  # no other worker can take it yet
    UNLOAD = "unload"  # idle for its keep_alive, or making room under the cap
    WAKE = "wake"  # a request wants it loaded
    WAKE_FAILED = "wake_failed"  # loading on request failed: idle-unloaded again, the error shown
    TERMINATE = "terminate"
    TERMINATE_FAILED = "terminate_failed"


P, E = Phase, Event
_LOADING = (P.LAUNCHING, P.WAKING, P.RESTORING)

TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (P.LAUNCHING, E.LOADED): P.READY,
    (P.WAKING, E.LOADED): P.READY,
    (P.RESTORING, E.LOADED): P.READY,
    (P.LAUNCHING, E.FAILED): P.FAILED,
    (P.RESTORING, E.FAILED): P.FAILED,
    (P.WAKING, E.FAILED): P.FAILED,  # for the moment: wake_failed makes the whole model idle-unloaded again
    (P.READY, E.FAILED): P.FAILED,  # its worker gave up on it, or a sibling's launch failed
    (P.RECORDED, E.FAILED): P.FAILED,
    (P.LOST, E.FAILED): P.FAILED,
    (P.MOVING, E.FAILED): P.FAILED,
    # A report that holds it: the worker's word. While a load is on its way, the load's reply decides (a report
    # that says it is ready counts as that reply: `loaded`).
    (P.RECORDED, E.HELD): P.READY,
    (P.READY, E.HELD): P.READY,
    (P.LOST, E.HELD): P.READY,
    (P.MOVING, E.HELD): P.READY,  # its worker came back while others were asked
    (P.FAILED, E.HELD): P.READY,  # its worker brought it back
    **{(phase, E.HELD): phase for phase in _LOADING},
    (P.READY, E.MISSING): P.LOST,
    (P.RECORDED, E.MISSING): P.LOST,
    (P.LOST, E.MISSING): P.LOST,
    (P.READY, E.WORKER_LOST): P.LOST,
    (P.RECORDED, E.WORKER_LOST): P.LOST,
    (P.LOST, E.WORKER_LOST): P.LOST,
    (P.RECORDED, E.NOT_RESTORED): P.UNLOADED,
    (P.LOST, E.NOT_RESTORED): P.UNLOADED,
    (P.READY, E.NOT_RESTORED): P.UNLOADED,
    **{(phase, E.LOAD_LOST): P.LOST for phase in _LOADING},
    (P.LOST, E.RESTORE): P.RESTORING,
    (P.RESTORING, E.RETRY_LATER): P.LOST,
    (P.LOST, E.MOVE): P.MOVING,
    (P.MOVING, E.MOVED): P.RESTORING,
    (P.MOVING, E.MOVE_FAILED): P.LOST,
    (P.READY, E.UNLOAD): P.UNLOADED,
    (P.UNLOADED, E.WAKE): P.WAKING,
    (P.WAKING, E.WAKE_FAILED): P.UNLOADED,
    (P.READY, E.WAKE_FAILED): P.UNLOADED,
    (P.FAILED, E.WAKE_FAILED): P.UNLOADED,
    **{(phase, E.TERMINATE): P.TERMINATING for phase in Phase},
    (P.TERMINATING, E.TERMINATE_FAILED): P.LOST,  # Replica.move puts it back where it was; LOST if unknown
}

LOADING = frozenset(_LOADING) | {P.MOVING}  # work for a worker is on its way: nothing else starts meanwhile


class IllegalMove(RuntimeError):
    """A move the table does not allow: a bug in the scheduler, never a client's fault."""


def next_phase(phase: Phase, event: Event) -> Phase:
    try:
        return TRANSITIONS[(phase, event)]
    except KeyError:
        raise IllegalMove(f"a replica in phase {phase.value} cannot take the event {event.value}") from None

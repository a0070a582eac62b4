"""llama.cpp cache slots (services/worker/instance/backends/slots.py): each adapter set's sequences stay one run
of neighbouring slots, with as few moves as that takes."""

from __future__ import annotations

import random

import pytest

from zinfer.services.worker.instance.backends import slots


def _runs_ok(taken: dict) -> bool:
    groups: dict = {}
    for slot, group in taken.items():
        groups.setdefault(group, []).append(slot)
    return all(max(s) - min(s) + 1 == len(s) for s in groups.values())


def _apply(taken: dict, moves) -> dict:
    taken = dict(taken)
    for src, dst in moves:
        assert dst not in taken, (src, dst, taken)
        taken[dst] = taken.pop(src)
    return taken


def test_sixteen_arrivals_of_three_sets_in_turn_fill_three_runs_without_a_move():
    """The benchmark's mix: base, A, B, base, ... into 16 slots. The first set starts at slot 0, the second at the
    top, the third in the middle of the gap: every set grows into free neighbours, no sequence moves."""
    taken: dict = {}
    for i in range(16):
        group = (None, "A", "B")[i % 3]
        slot, moves = slots.place(taken, group, 16)
        assert moves == [] and slot not in taken
        taken[slot] = group
        assert _runs_ok(taken)
    assert sorted(s for s, g in taken.items() if g is None) == list(range(6))


def test_a_run_with_no_free_neighbour_gets_one_by_moving_the_runs_between():
    taken = {0: "a", 1: "a", 2: "b", 3: "b", 4: "c"}  # 5..7 free
    slot, moves = slots.place(taken, "a", 8)
    assert slot == 2 and moves == [(4, 5), (2, 4)]  # c's run and b's run each move one along, from the free end
    after = _apply(taken, moves)
    after[slot] = "a"
    assert _runs_ok(after) and sorted(after) == list(range(6))
    # toward the nearer side in runs to cross: free slot 0 below, one run (x) in between
    taken = {1: "x", 2: "y", 3: "y", 4: "z", 5: "w", 6: "v"}
    slot, moves = slots.place(taken, "y", 8)
    assert (slot, moves) == (1, [(1, 0)])  # not z, w and v up toward 7
    slot, moves = slots.place({0: "x", 1: "x", 2: "y", 3: "z", 4: "w", 6: "v"}, "y", 8)
    assert (slot, moves) == (3, [(4, 5), (3, 4)])  # nothing free below: z and w move up, toward 5


def test_holes_close_from_the_runs_top():
    assert slots.compact({0: None, 2: None, 3: None, 5: None}) == [(5, 1)]
    assert slots.compact({0: None, 1: None, 5: "a", 6: "a"}) == []
    assert slots.compact({0: None, 4: None, 6: "a", 9: "a"}) == [(4, 1), (9, 7)]
    assert slots.compact({0: "a", 1: "b", 2: "a"}) == []  # another set inside: left (never a loop)
    with pytest.raises(ValueError):
        slots.place({0: "a"}, "a", 1)


@pytest.mark.parametrize("seed", range(20))
def test_any_churn_keeps_every_set_one_run(seed):
    """Random arrivals and departures over 4 sets in 12 slots: after each arrival (holes closed first, as the
    backend does) every set is one run, and moves only ever go to free slots."""
    rng = random.Random(seed)
    taken: dict = {}
    moved = 0
    for _ in range(300):
        if taken and (len(taken) == 12 or rng.random() < 0.45):
            del taken[rng.choice(list(taken))]
            continue
        moves = slots.compact(taken)
        taken = _apply(taken, moves)
        group = rng.choice([None, "a", "b", "c"])
        slot, more = slots.place(taken, group, 12)
        taken = _apply(taken, more)
        assert slot not in taken
        taken[slot] = group
        moved += len(moves) + len(more)
        assert _runs_ok(taken), taken
    assert moved < 300 * 2  # moves stay few: about one per departure from inside a run

"""Which llama.cpp cache slot each sequence decodes in.

llama.cpp (a cache stream per sequence) decodes a batch in one micro-batch only while its sequences' slots follow
each other (llama_batch_allocr::split_equal accepts only the next sequence id). Measured on the small model: 8
streams in alternate slots ran at 0.17x the speed of 8 in a row; with adapters, which decode one set at a time, a
set of 6 in slots 0-4 and 15 took 17 ms a step against 10 for 5 in a row. So each adapter set's slots (the base
model's too) are kept one run of neighbours: a new sequence goes next to its set's run, and a hole left by a
sequence that ended is filled from the run's end. A sequence moves by a copy of its cache stream (llama.cpp does it
at the next decode: ~10 ms for the small model's 2,048 cells), so moves are few: none while runs have room.

Pure functions over {slot: group} maps; the backend applies the moves they answer.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Hashable

Moves = list[tuple[int, int]]  # (from slot, to slot), in the order to make them


def place(taken: dict[int, Hashable], group: Hashable, n: int) -> tuple[int, Moves]:
    """A free slot for a new sequence of `group` among n slots (`taken`: each busy slot's group), and the moves
    that free it. Next to the group's run (above first). A group with no sequences starts at slot 0 when nothing
    runs, else where it has the most room to grow: an end of the slots in a free gap that reaches it, or the
    middle of a gap between two runs. A run with no free neighbour gets one from the nearest free slot: each
    other run in between moves one slot along (its end sequence to the slot past its other end)."""
    free = [s for s in range(n) if s not in taken]
    if not free:
        raise ValueError("no free slot")
    mine = [s for s, g in taken.items() if g == group]
    if not mine:
        return _start(free, n, bool(taken)), []
    lo, hi = min(mine), max(mine)
    for slot in (hi + 1, lo - 1):
        if 0 <= slot < n and slot not in taken:
            return slot, []

    def runs(span: range) -> int:
        return sum(1 for s in span if s == span[0] or taken[s] != taken[s - span.step])

    up = min((s for s in free if s > hi), default=None)
    down = max((s for s in free if s < lo), default=None)
    if down is None or (up is not None and runs(range(hi + 1, up)) <= runs(range(lo - 1, down, -1))):
        edge, target, step = hi, up, -1
    else:
        edge, target, step = lo, down, 1
    moves: Moves = []
    while target != edge - step:  # the run next to the free target moves one along, into it
        start = target + step
        while start + step != edge and taken[start + step] == taken[target + step]:
            start += step
        moves.append((start, target))
        target = start
    return target, moves


def _start(free: list[int], n: int, busy: bool) -> int:
    if not busy:
        return free[0]
    gaps, first = [], free[0]
    for a, b in zip(free, [*free[1:], None], strict=True):
        if b != a + 1:
            gaps.append((first, a))
            first = b
    # An edge gap is all the group's to grow into; a gap between runs is shared with the run on either side.
    a, b = max(gaps, key=lambda g: (g[1] - g[0] + 1) * (2 if g[0] == 0 or g[1] == n - 1 else 1))
    return 0 if a == 0 else n - 1 if b == n - 1 else (a + b) // 2


def compact(taken: dict[int, Hashable]) -> Moves:
    """Moves that fill each group's holes (free slots inside its run) from the run's top."""
    taken = dict(taken)
    groups: dict[Hashable, list[int]] = {}
    for slot, group in sorted(taken.items()):
        groups.setdefault(group, []).append(slot)
    moves: Moves = []
    for slots in groups.values():
        while slots[-1] - slots[0] + 1 > len(slots):
            hole = next((s for s in range(slots[0] + 1, slots[-1]) if s not in taken), None)
            if hole is None:  # another group's sequence inside the run: left as it is
                break
            top = slots.pop()
            moves.append((top, hole))
            taken[hole] = taken.pop(top)
            insort(slots, hole)
    return moves

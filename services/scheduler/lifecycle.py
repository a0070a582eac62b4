"""Model lifecycle in the scheduler: keep_alive (an idle instance is unloaded, its memory freed, and stays
launched as `idle-unloaded`), load on request (an unloaded instance by any request to it; a registration with no
instance by its name, for the roles a setting names, with its last launch's options), the cap on loaded instances
per device (the least recently used idle one makes room), and what the mesh restores when it starts.

The choices are pure functions, unit-tested without a mesh; the scheduler's loop (services/scheduler/core.py) acts
on them.
"""

from __future__ import annotations

from zinfer.services.scheduler.book import Model
from zinfer.shared import durations
from zinfer.shared.errors import Unavailable


def expired(model: Model, now: float) -> bool:
    """Loaded, ready, idle, and idle for its keep_alive (wall-clock seconds `now`)."""
    deadline = model.expires_at()
    return deadline is not None and not model.waking and model.idle and now >= deadline


def room_on(worker_id: str, models: list[Model], cap: int, coming: str) -> Model | None:
    """Loading `coming` on this worker: None when the cap (0: none) leaves room; else the least recently used
    idle loaded instance there, to unload. Unavailable when every one there has work (none is unloaded then)."""
    if cap <= 0:
        return None
    loaded = [m for m in models if m.uid != coming and not m.unloaded and not m.terminating and not m.error
              and any(r.worker_id == worker_id for r in m.replicas)]
    if len(loaded) < cap:
        return None
    idle = [m for m in loaded if m.idle and not m.waking and m.state == "ready"]
    if not idle:
        raise Unavailable(f"worker {worker_id} holds {len(loaded)} loaded instances (max_loaded_per_device {cap}) "
                          f"and every one has work or is loading: {', '.join(sorted(m.uid for m in loaded))}; "
                          "try again when one is idle")
    return min(idle, key=Model.active_at)


def resolve_keep_alive(keep_alive: float | None, setting: str) -> float | None:
    """A launch's keep_alive (None: the setting's), as the book keeps it: seconds, or None for ever."""
    if keep_alive is None:
        return durations.parse(setting, "keep_alive")
    return None if keep_alive < 0 else keep_alive

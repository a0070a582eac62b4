"""Ollama's keep_alive, as zinfer takes it: how long a model instance stays loaded once idle.

A number is seconds; a string is seconds ("300") or a Go-style duration ("5m", "1h30m", "90s", "500ms"); 0 unloads
it right after its reply; a negative value keeps it loaded for ever. `parse` gives seconds (float), or None for
ever; `show` writes seconds back as a short duration.
"""

from __future__ import annotations

import math
import re

from zinfer.shared.errors import InvalidRequest

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")
FOREVER = -1.0  # what a launch message carries for "for ever" (None there means: the keep_alive setting)


def parse(value: object, field: str = "keep_alive") -> float | None:
    """Seconds to stay loaded once idle (0: unload after the reply), or None: for ever. InvalidRequest names
    `field` for anything else."""
    if isinstance(value, bool) or value is None:
        raise InvalidRequest(f"{field} {value!r} must be a duration (\"5m\", \"1h30m\", \"90s\"), seconds, 0 or "
                             "a negative number (for ever)", field=field)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        else:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = _PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise InvalidRequest(f"{field} {value!r} is not a duration: use a number of seconds or units ns, "
                                     "us, ms, s, m, h (\"5m\", \"1h30m\")", field=field)
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise InvalidRequest(f"{field} must be a duration string or a number of seconds, not "
                             f"{type(value).__name__}", field=field)
    if math.isnan(seconds) or math.isinf(seconds):
        raise InvalidRequest(f"{field} {value!r} is not a finite duration", field=field)
    return None if seconds < 0 else seconds


def show(seconds: float | None) -> str:
    """A short duration ("5m", "1h30m", "2s", "0s"), or "forever"."""
    if seconds is None:
        return "forever"
    if seconds < 60:
        return f"{seconds:g}s"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{u}" for n, u in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)

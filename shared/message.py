"""The base of every message on the bus, and the error reply: what every other message module builds on."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

from zinfer.shared.models import FieldProblem


class Msg(Struct, tag_field="op", kw_only=True, omit_defaults=True):
    """Base of every message; the class name is the tag."""


ErrorCode = Literal[
    "invalid",  # bad input; `field` / `problems` say where
    "not_found",
    "conflict",  # already exists, in use
    "state",  # an instance that is not ready
    "too_large",
    "unavailable",  # the process serving it died, or the connection to it is gone
    "no_route",  # nothing serves that target (no such service or model uid is running)
    "queue_full",  # a queue on the way is full: try again later
    "timeout",
    "cancelled",
    "protocol",
    "storage",  # the server's own files: disk full, read-only
    "forbidden",  # the caller's role may not do this
    "unauthenticated",  # no usable key, or the key was refused
    "internal",
]


class Error(Msg, kw_only=True):
    code: ErrorCode
    message: str
    field: str | None = None
    problems: list[FieldProblem] = []

"""structlog set-up for every zinfer process: console on a TTY, JSON lines otherwise.

Every line, from every thread and from libraries that log through the standard library, carries `service`
and `pid` (a processor adds them; thread-local context would miss the threads a process starts). Exceptions are
rendered without local variables: structlog's default dict tracebacks include them, and they can hold prompts.
Services log events and sizes, never request text.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog
from structlog.tracebacks import ExceptionDictTransformer


def _process_fields(service: str):
    pid = os.getpid()

    def add(_logger, _name, event: dict) -> dict:
        event.setdefault("service", service)
        event.setdefault("pid", pid)
        return event

    return add


def configure_logging(service: str, level: str | None = None) -> structlog.stdlib.BoundLogger:
    level_name = (level or os.environ.get("ZINFER_LOG_LEVEL") or "INFO").upper()
    tty = sys.stderr.isatty()
    if tty:
        renderer = structlog.dev.ConsoleRenderer(
            colors=True, exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False))
        exceptions = structlog.dev.set_exc_info
    else:
        renderer = structlog.processors.JSONRenderer()
        exceptions = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _process_fields(service),
    ]
    structlog.configure(
        processors=[*shared, exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level_name)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library (transformers, huggingface_hub) go the same way.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=[*shared, exceptions], processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer])
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    structlog.contextvars.clear_contextvars()
    return structlog.get_logger()

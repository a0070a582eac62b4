"""structlog set-up for every zinfer process: a log file per service, and stderr (console on a TTY, JSON lines
otherwise).

Each service writes `<home>/logs/<service>.log` (worker/cuda:0 -> worker-cuda-0.log): one JSON object per line,
rotated at `log_max_mb`, read by `zinfer logs`. Every record goes through the standard library's handlers, which
write a record and its newline in one call, so lines from processes sharing a stderr do not run together.

Every line, from every thread and from libraries that log through the standard library, carries `service`
and `pid` (a processor adds them; thread-local context would miss the threads a process starts). Exceptions are
rendered without local variables: structlog's default dict tracebacks include them, and they can hold prompts.
Services log events and sizes, never request text.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
from pathlib import Path

import structlog
from structlog.tracebacks import ExceptionDictTransformer


def log_name(service: str) -> str:
    """A service name as a log file's stem: worker/cuda:0 -> worker-cuda-0."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", service).strip("-") or "zinfer"


def log_folder(home: Path) -> Path:
    return home / "logs"


def _process_fields(service: str):
    pid = os.getpid()

    def add(_logger, _name, event: dict) -> dict:
        event.setdefault("service", service)
        event.setdefault("pid", pid)
        return event

    return add


def json_renderers() -> list:
    return [structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer()]


def console_renderers(colors: bool = True) -> list:
    return [structlog.dev.set_exc_info, structlog.dev.ConsoleRenderer(
        colors=colors, exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False))]


def configure_logging(service: str, home: Path | None = None, level: str | None = None, max_mb: int = 20,
                      backups: int = 3) -> structlog.stdlib.BoundLogger:
    """Log to stderr, and (given `home`) to the service's rotating JSON-lines file."""
    level_name = (level or os.environ.get("ZINFER_LOG_LEVEL") or "INFO").upper()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _process_fields(service),
    ]

    def formatter(renderers: list) -> logging.Formatter:
        return structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderers])

    handlers: list[logging.Handler] = []
    if home is None or os.environ.get("ZINFER_LOG_STDERR", "1") != "0":  # `zinfer up` sets 0 for its children
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(formatter(console_renderers() if sys.stderr.isatty() else json_renderers()))
        handlers.append(stderr)
    if home is not None:
        folder = log_folder(home)
        folder.mkdir(parents=True, exist_ok=True)
        file = logging.handlers.RotatingFileHandler(folder / f"{log_name(service)}.log", encoding="utf-8",
                                                    maxBytes=max_mb * 2**20, backupCount=backups, delay=True)
        file.setFormatter(formatter(json_renderers()))
        handlers.append(file)

    # zinfer's own events at the chosen level; libraries (transformers, huggingface_hub) at WARNING and up.
    ours = logging.getLogger("zinfer")
    ours.handlers[:] = handlers
    ours.setLevel(logging.getLevelName(level_name))
    ours.propagate = False
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level_name)),
        logger_factory=lambda *_args: ours,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    return structlog.get_logger()

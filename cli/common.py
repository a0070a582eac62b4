"""Shared CLI pieces: the --endpoint option, client creation, one-line errors and tables."""

from __future__ import annotations

import functools
import json
from typing import Annotated

import msgspec
import typer
import zmq
from rich.console import Console
from rich.table import Table

from shared.client import Client
from shared.config import ConfigError, load_settings
from shared.errors import ZinferError

console = Console()
if not console.is_terminal:  # piped or captured: don't fold names at 80 columns
    console = Console(width=200)
err_console = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 200)

Endpoint = Annotated[
    str | None,
    typer.Option("--endpoint", "-e", help="Broker endpoint (default: config, or ZINFER_ENDPOINT).",
                 show_default=False),
]
Timeout = Annotated[float | None, typer.Option("--timeout", help="Seconds to wait for each reply.")]


def fail(message: str) -> None:
    for line in str(message).splitlines() or [""]:
        err_console.print(f"[red]error:[/red] {line}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(1)


def friendly_errors(fn):
    """User mistakes and service errors end as red lines and exit 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ZinferError, ConfigError) as exc:
            fail(str(exc))
        except zmq.ZMQError as exc:
            fail(f"network: {exc}")
        except (OSError, msgspec.DecodeError) as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper


def make_client(endpoint: str | None, timeout: float | None = None) -> Client:
    settings = load_settings(endpoint=endpoint)
    return Client(settings=settings, timeout=timeout)


def print_table(columns: list[str], rows: list[list], title: str | None = None) -> None:
    table = Table(title=title, show_lines=False, header_style="bold")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*["" if v is None else str(v) for v in row])
    console.print(table)


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))

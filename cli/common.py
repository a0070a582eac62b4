"""Shared CLI pieces: the --endpoint option, client creation, one-line errors, tables, and XCommand (Xinference's
spellings of our options)."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from typing import TYPE_CHECKING, Annotated

import msgspec
import typer
import zmq
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

try:  # typer 0.29 carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # older typer runs on click itself
    from click import ClickException

from zinfer.shared.config import ConfigError, load_settings
from zinfer.shared.errors import ZinferError

if TYPE_CHECKING:  # the client (and numpy under it) is imported by the commands that talk to the mesh, not by
    from zinfer.shared.client import Client  # the services' commands, which start as processes of their own

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

# --debug (anywhere on the line) or ZINFER_DEBUG=1: show the traceback of an error instead of one line.
DEBUG = os.environ.get("ZINFER_DEBUG", "").lower() in ("1", "true", "yes")
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def set_debug(value: bool) -> None:
    global DEBUG
    DEBUG = DEBUG or value


# Options that take two values (NAME PATH), as Xinference's click options do; typer's take one (NAME=PATH).
PAIR_OPTIONS = ("--lora-modules", "-lm")


class XCommand(TyperCommand):
    """A command that also takes Xinference's spellings of its options, rewritten before click parses them:

    - `--max_tokens 8` for `--max-tokens 8` (an underscore spelling of any option the command has);
    - `--stream false` / `--stream=true` for `--no-stream` / `--stream` (any on/off option);
    - `--lora-modules NAME PATH` for `--lora-modules NAME=PATH` (PAIR_OPTIONS);
    - `--debug` anywhere on the line.
    """

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self.normalize(args))

    def normalize(self, args: list[str]) -> list[str]:
        names: set[str] = set()
        flags: dict[str, tuple[str, str]] = {}  # --stream -> ("--stream", "--no-stream")
        for param in self.params:
            if getattr(param, "param_type_name", "") == "option":
                names.update(param.opts + param.secondary_opts)
                if param.is_flag and param.secondary_opts:
                    for opt in param.opts:
                        flags[opt] = (opt, param.secondary_opts[0])
        out: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            i += 1
            if arg == "--":
                out += args[i - 1:]
                break
            if arg == "--debug":
                set_debug(True)
                continue
            if arg in PAIR_OPTIONS and arg in names and i + 1 < len(args):  # Xinference's `--lora-modules NAME PATH`
                out += [arg, f"{args[i]}={args[i + 1]}"]
                i += 2
                continue
            if not arg.startswith("--"):
                out.append(arg)
                continue
            name, eq, value = arg.partition("=")
            if name not in names and "_" in name and name.replace("_", "-") in names:
                name = name.replace("_", "-")
            if name in flags:
                on, off = flags[name]
                word = value if eq else (args[i] if i < len(args) else None)
                if word is not None and word.lower() in _BOOL_WORDS:
                    out.append(on if _BOOL_WORDS[word.lower()] else off)
                    if not eq:
                        i += 1
                    continue
                if eq:
                    raise typer.BadParameter(f"{value!r} is not true or false", param_hint=name)
            out.append(name + eq + value)
        return out


def fail(message: str, code: int = 1) -> None:
    for line in str(message).splitlines() or [""]:
        err_console.print(f"[red]error:[/red] {line}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _describe(exc: BaseException) -> str:
    """One line for an error nobody planned for: its type and text, and how to see more."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, UnicodeDecodeError):
        text = f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
    return f"{text} [{type(exc).__name__}] (run with --debug for the traceback)"


def friendly_errors(fn):
    """Every error ends as red lines and a non-zero exit code, never a traceback (unless --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - the one place every error becomes a line
            if DEBUG:
                traceback.print_exc(file=sys.stderr)
            if isinstance(exc, ZinferError | ConfigError):
                fail(str(exc))
            if isinstance(exc, zmq.ZMQError):
                fail(f"network: {exc}")
            if isinstance(exc, OSError | msgspec.DecodeError) and not isinstance(exc, UnicodeError):
                fail(str(exc))
            fail(_describe(exc))

    return wrapper


def read_text(path, option: str) -> str:
    """A file the user named, as text: a missing file or one that is not UTF-8 is one line naming the option."""
    try:
        return open(path, encoding="utf-8").read()  # noqa: SIM115 - read at once
    except OSError as exc:
        fail(f"{option} {path}: {exc.strerror}")
    except UnicodeDecodeError as exc:
        fail(f"{option} {path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
             "save it as UTF-8")


def make_client(endpoint: str | None, timeout: float | None = None) -> Client:
    from zinfer.shared.client import Client

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


def command(app: typer.Typer, fn, name: str | None = None, **settings) -> None:
    """Add `fn` as a command that takes Xinference's spellings (XCommand) and ends errors as one line."""
    app.command(name or fn.__name__, cls=XCommand, **settings)(friendly_errors(fn))

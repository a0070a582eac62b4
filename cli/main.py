"""The `zinfer` command: composed from one module per command group.

A line that runs one of the mesh's processes (`zinfer broker`, `zinfer worker`, ...) gets an app of those commands
only: each process of a mesh starts without importing the client and the other command groups it never runs.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from zinfer.cli import common, mesh

HELP = "zinfer: register your own models, launch them on GPUs or the CPU, generate, embed and rerank."


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zinfer")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"zinfer {_version()}")
        raise typer.Exit()


def main_options(
    _version_flag: Annotated[bool, typer.Option("--version", "-v", callback=_show_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors "
                                        "(also ZINFER_DEBUG=1).")] = False,
) -> None:
    common.set_debug(debug)


def build(services_only: bool = False) -> typer.Typer:
    """The whole command, or (services_only) the commands that run the mesh's processes, with the same options."""
    app = typer.Typer(no_args_is_help=True, add_completion=not services_only, pretty_exceptions_enable=False,
                      help=HELP)
    app.callback()(main_options)
    if services_only:
        mesh.install_services(app)
        return app
    from zinfer.cli import dev, infer_cmds, keys_cmds, lora_cmds, model_cmds, ops_cmds, registry_cmds

    mesh.install(app)
    ops_cmds.install(app)
    registry_cmds.install(app)
    model_cmds.install(app)
    infer_cmds.install(app)
    app.add_typer(keys_cmds.app, name="keys")
    app.add_typer(lora_cmds.app, name="lora")
    app.add_typer(dev.app, name="dev")
    return app


def _runs_a_service(args: list[str]) -> bool:
    """Whether the line's command is one of the mesh's processes (its first word that is not an option)."""
    first = next((a for a in args if not a.startswith("-")), None)
    return first in mesh.SERVICES and "--help" not in args


def main() -> None:
    build(services_only=_runs_a_service(sys.argv[1:]))()


if __name__ == "__main__":
    main()

"""The `zinfer` command: composed from one module per command group."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

from zinfer.cli import common, dev, infer_cmds, keys_cmds, lora_cmds, mesh, model_cmds, ops_cmds, registry_cmds

app = typer.Typer(no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
                  help="zinfer: register your own models, launch them on GPUs or the CPU, generate, embed and rerank.")


def _version() -> str:
    try:
        return version("zinfer")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"zinfer {_version()}")
        raise typer.Exit()


@app.callback()
def main_options(
    _version_flag: Annotated[bool, typer.Option("--version", "-v", callback=_show_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors "
                                        "(also ZINFER_DEBUG=1).")] = False,
) -> None:
    common.set_debug(debug)


mesh.install(app)
ops_cmds.install(app)
registry_cmds.install(app)
model_cmds.install(app)
infer_cmds.install(app)
app.add_typer(keys_cmds.app, name="keys")
app.add_typer(lora_cmds.app, name="lora")
app.add_typer(dev.app, name="dev")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""The `zinfer` command: composed from one module per command group."""

from __future__ import annotations

import typer

from cli import dev, infer_cmds, keys_cmds, mesh, model_cmds, registry_cmds

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="zinfer: register your own models, launch them on GPUs or the CPU, generate and embed.")
mesh.install(app)
registry_cmds.install(app)
model_cmds.install(app)
infer_cmds.install(app)
app.add_typer(keys_cmds.app, name="keys")
app.add_typer(dev.app, name="dev")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""Developer helpers: `zinfer dev make-tiny-models DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zinfer.cli.common import friendly_errors

app = typer.Typer(no_args_is_help=True, help="Developer helpers (test models).")


@app.command("make-tiny-models")
@friendly_errors
def make_tiny_models_cmd(
    directory: Annotated[Path, typer.Argument(help="Where to write the models.")],
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if present.")] = False,
    small_llama: Annotated[bool, typer.Option(
        "--small-llama", help="Also a small random Llama (hidden 512, 8 layers, 104 MB F32) for benchmarks.")] = False,
) -> None:
    """Build the tiny Llama (transformers, GGUF, GGML v3), two LoRA adapters of it (PEFT and GGUF) and the
    cross-encoder, and copy the MiniLM embedding model."""
    from zinfer.shared.tinymodels import make_small_llama, make_tiny_models

    built = make_tiny_models(directory, force=force)
    if small_llama:
        built.update(make_small_llama(directory, force=force))
    for kind, path in built.items():
        typer.echo(f"{kind}: {path}")

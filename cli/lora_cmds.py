"""`zinfer lora`: LoRA adapters of a running LLM, loaded and unloaded without a relaunch (admin keys)."""

from __future__ import annotations

from typing import Annotated

import typer

from zinfer.cli.common import Endpoint, Timeout, command, make_client, print_json, print_table

app = typer.Typer(no_args_is_help=True, help="LoRA adapters of running LLMs: load, unload, list.")

Uid = Annotated[str, typer.Argument(help="The launched model's uid.")]
Name = Annotated[str, typer.Argument(help="The adapter's name (requests pick it with lora_name, or model UID:NAME).")]


def load(model_uid: Uid, lora_name: Name,
         lora_path: Annotated[str, typer.Argument(help="A PEFT folder (transformers) or a GGUF LoRA file (llama.cpp) "
                                                  "on the worker's host, or a Hub repository id.")],
         scale: Annotated[float, typer.Option("--scale", help="Its strength (llama.cpp; requests may ask for "
                                              "another with lora_scale).")] = 1.0,
         endpoint: Endpoint = None, timeout: Timeout = None) -> None:
    """Load an adapter into every replica of a running LLM; a restart or a restore keeps it."""
    with make_client(endpoint, timeout) as client:
        client.load_lora(model_uid, lora_name, lora_path, scale)
    typer.echo(f"loaded LoRA adapter {lora_name} into {model_uid}")


def unload(model_uid: Uid, lora_name: Name, endpoint: Endpoint = None, timeout: Timeout = None) -> None:
    """Unload an adapter; requests that name it are refused from then on."""
    with make_client(endpoint, timeout) as client:
        client.unload_lora(model_uid, lora_name)
    typer.echo(f"unloaded LoRA adapter {lora_name} from {model_uid}")


def list_loras(model_uid: Uid,
               as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
               endpoint: Endpoint = None, timeout: Timeout = None) -> None:
    """The adapters a running LLM holds."""
    with make_client(endpoint, timeout) as client:
        loras = client.list_loras(model_uid)
    if as_json:
        print_json(loras)
        return
    print_table(["Name", "Path", "Scale"], [[x["lora_name"], x["local_path"], x.get("lora_scale", 1.0)]
                                           for x in loras])


command(app, load)
command(app, unload)
command(app, list_loras, "list")

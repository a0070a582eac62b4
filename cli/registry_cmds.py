"""register, registrations, registration, unregister (Xinference's verbs and flags)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from zinfer.cli.common import Endpoint, Timeout, command, fail, make_client, print_json, print_table, read_text
from zinfer.shared.errors import NotFound
from zinfer.shared.models import MODEL_TYPES

ModelType = Annotated[str, typer.Option("--model-type", "-t", help="LLM, embedding, rerank or audio.")]


def register(
    model_type: Annotated[str | None, typer.Option("--model-type", "-t", help="LLM, embedding, rerank or audio (with "
                                                   "--from-path: read from the files when left out).")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="The model definition (JSON).")] = None,
    from_path: Annotated[str | None, typer.Option(
        "--from-path", help="Fill the definition in from a model folder or GGUF file (config, tokenizer, template, "
        "headers; never the weights) and register it.")] = None,
    from_hub: Annotated[str | None, typer.Option(
        "--from-hub", help="Fill the definition in from a Hugging Face repository id, fetching only its config, "
        "tokenizer and template files (HF_ENDPOINT and HF_TOKEN as for downloads).")] = None,
    revision: Annotated[str | None, typer.Option("--model-revision", help="With --from-hub: a branch, tag or "
                                                 "commit.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="With --from-path or --from-hub: the model_name.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --from-path or --from-hub: print the definition, "
                                          "register nothing.")] = False,
    persist: Annotated[bool, typer.Option("--persist", "-p", help="Keep it across restarts.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a custom model of the same name (none of its "
                                        "instances may be running).")] = False,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """Register a custom model from a JSON definition (--file), or from the model's own files (--from-path, or
    --from-hub)."""
    if sum(x is not None for x in (file, from_path, from_hub)) != 1:
        fail("give one of --file (a JSON definition), --from-path (a model folder or GGUF file) or --from-hub (a "
             "Hugging Face repository id)")
    if from_path is not None or from_hub is not None:
        from zinfer.shared import fromfiles

        model_type, definition = fromfiles.registration_from_path(from_path, model_type, name) if from_path \
            else fromfiles.registration_from_hub(from_hub, model_type, name, revision)
        print_json(definition)
        if dry_run:
            return
        with make_client(endpoint, timeout) as client:
            client.register_model(model_type=model_type, model=json.dumps(definition), persist=persist, force=force)
        typer.echo(f"registered {model_type} model {definition['model_name']} from {from_path or from_hub}"
                   + (" (persisted)" if persist else ""), err=True)
        return
    model_type = model_type or "LLM"
    text = read_text(file, "--file")
    with make_client(endpoint, timeout) as client:
        client.register_model(model_type=model_type, model=text, persist=persist, force=force)
    verb = "registered or replaced" if force else "registered"
    typer.echo(f"{verb} {model_type} model from {file}" + (" (persisted)" if persist else ""))


def registrations(
    model_type: ModelType = "LLM",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """List built-in and custom models of a type."""
    with make_client(endpoint, timeout) as client:
        items = client.list_model_registrations(model_type=model_type)
    if as_json:
        print_json(items)
        return
    if model_type == "embedding":
        rows = [[i["model_type"], i["model_name"], i["dimensions"], i["max_tokens"], ", ".join(i["model_lang"]),
                 "yes" if i["is_builtin"] else "no"] for i in items]
        print_table(["Type", "Name", "Dimensions", "Max tokens", "Languages", "Built-in"], rows)
        return
    if model_type == "rerank":
        rows = [[i["model_type"], i["model_name"], i.get("rerank_type") or "", i.get("max_tokens") or "",
                 ", ".join(i["model_lang"]), "yes" if i["is_builtin"] else "no"] for i in items]
        print_table(["Type", "Name", "Rerank type", "Max tokens", "Languages", "Built-in"], rows)
        return
    rows = [[i["model_type"], i["model_name"], ", ".join(i["model_lang"]), ", ".join(i["model_format"]),
             ", ".join(i["model_ability"]), i["model_family"] or "", i["context_length"] or "",
             "yes" if i["is_builtin"] else "no"] for i in items]
    print_table(["Type", "Name", "Languages", "Formats", "Abilities", "Family", "Context", "Built-in"], rows)


def registration(
    model_name: Annotated[str, typer.Argument(help="The model's name.")],
    model_type: Annotated[str | None, typer.Option(
        "--model-type", "-t", help="LLM, embedding, rerank or audio (default: whichever has the name).")] = None,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """One registration's JSON, as it was registered: edit it and `zinfer register --force` it back."""
    with make_client(endpoint, timeout) as client:
        for kind in [model_type] if model_type else list(MODEL_TYPES):
            try:
                definition = client.get_model_registration(kind, model_name)
            except NotFound:
                continue
            print_json(definition)
            return
    fail(f"model_name: no {model_type or 'LLM, embedding, rerank or audio'} model named {model_name!r} is registered")


def unregister(
    model_type: ModelType = "LLM",
    model_name: Annotated[str, typer.Option("--model-name", "-n", help="The custom model's name.")] = ...,
    force: Annotated[bool, typer.Option("--force", help="Even while instances are launched.")] = False,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """Unregister a custom model (and delete its persisted definition)."""
    with make_client(endpoint, timeout) as client:
        client.unregister_model(model_type=model_type, model_name=model_name, force=force)
    typer.echo(f"unregistered {model_type} model {model_name}")


def install(app: typer.Typer) -> None:
    for fn in (register, registrations, registration, unregister):
        command(app, fn)

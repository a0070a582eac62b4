"""launch, list, describe, terminate (Xinference's verbs and flags)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cli.common import Endpoint, Timeout, console, friendly_errors, make_client, print_json, print_table

Uid = Annotated[str, typer.Option("--model-uid", "-u", help="The launched model's uid.")]


def _engine_kwargs(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--engine-arg")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def launch(
    model_name: Annotated[str, typer.Option("--model-name", "-n", help="A registered model's name.")],
    model_type: Annotated[str, typer.Option("--model-type", "-t")] = "LLM",
    model_format: Annotated[str | None, typer.Option("--model-format", "-f")] = None,
    size_in_billions: Annotated[str | None, typer.Option("--size-in-billions", "-s")] = None,
    quantization: Annotated[str | None, typer.Option("--quantization", "-q")] = None,
    model_uid: Annotated[str | None, typer.Option("--model-uid", "-u")] = None,
    replica: Annotated[int, typer.Option("--replica", "-r")] = 1,
    n_gpu: Annotated[str, typer.Option("--n-gpu", help="auto, 0 (CPU) or 1.")] = "auto",
    gpu_idx: Annotated[list[int] | None, typer.Option("--gpu-idx", help="Pin to these GPUs.")] = None,
    device: Annotated[list[str] | None, typer.Option(
        "--device", help="Pin to these workers (e.g. cpu:1, cuda:0).")] = None,
    engine_arg: Annotated[list[str] | None, typer.Option(
        "--engine-arg", help="KEY=VALUE passed to the engine (e.g. max_batch_size=64).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until it is ready.")] = True,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """Launch a registered model on the best device and print its uid."""
    size = int(size_in_billions) if size_in_billions and size_in_billions.isdigit() else size_in_billions
    with make_client(endpoint, timeout) as client:
        uid = client.launch_model(
            model_name=model_name, model_type=model_type, model_format=model_format,
            model_size_in_billions=size, quantization=quantization, model_uid=model_uid, replica=replica,
            n_gpu=int(n_gpu) if n_gpu.isdigit() else n_gpu, gpu_idx=gpu_idx, devices=device, wait=False,
            **_engine_kwargs(engine_arg))
        if wait:
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[state]}"),
                          TimeElapsedColumn(), console=console, transient=True) as bar:
                task = bar.add_task(f"launching {uid}", total=1.0, state="launching")

                def show(view):
                    bar.update(task, completed=view["progress"],
                               state=f"{view['state']} on {', '.join(view['devices'])}")

                client.wait_model(uid, timeout or client.settings.launch_timeout, show)
    typer.echo(f"Model uid: {uid}")


def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """Launched models: uid, name, type, format, size, quantization, devices, state."""
    with make_client(endpoint, timeout) as client:
        models = client.list_models()
    if as_json:
        print_json(models)
        return
    rows = [[m["model_uid"], m["model_name"], m["model_type"], m["model_format"],
             m["model_size_in_billions"] or "", m["quantization"], ", ".join(m["devices"]),
             m["state"] + (f" ({m['error']})" if m["error"] else ""), m["queue_depth"],
             ", ".join(m["address"])] for m in models.values()]
    print_table(["UID", "Name", "Type", "Format", "Size (B)", "Quantization", "Devices", "State", "Queue",
                 "Address"], rows)


def describe(model_uid: Uid, endpoint: Endpoint = None, timeout: Timeout = None) -> None:
    """One launched model, as JSON."""
    with make_client(endpoint, timeout) as client:
        print_json(client.describe_model(model_uid))


def terminate(model_uid: Uid, endpoint: Endpoint = None, timeout: Timeout = None) -> None:
    """Unload a launched model and free its memory."""
    with make_client(endpoint, timeout) as client:
        client.terminate_model(model_uid)
    typer.echo(f"terminated {model_uid}")


def install(app: typer.Typer) -> None:
    app.command("launch")(friendly_errors(launch))
    app.command("list")(friendly_errors(list_models))
    app.command("describe")(friendly_errors(describe))
    app.command("terminate")(friendly_errors(terminate))

"""launch, list, describe, terminate (Xinference's verbs and flags)."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from zinfer.cli.common import Endpoint, Timeout, command, console, make_client, print_json, print_table
from zinfer.shared import durations

Uid = Annotated[str, typer.Option("--model-uid", "-u", help="The launched model's uid.")]


def _value(text: str):
    """A command-line value as the engine option's type: int, float, true/false, none, else the text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return {"true": True, "false": False, "none": None, "null": None}.get(text.lower(), text)


def _engine_kwargs(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--engine-arg")
        out[key] = _value(value)
    return out


def _extra_options(args: list[str]) -> dict:
    """Xinference's extra launch options, `--name value` (or `--name=value`) after the known ones -> keywords
    (checked by the client: an unknown name is refused with the closest valid one)."""
    out = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise typer.BadParameter(f"unexpected argument {arg!r} (extra options are --name value)")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise typer.BadParameter(f"--{name} needs a value (--{name} VALUE)")
            value = args[i + 1]
            i += 1
        out[name.replace("-", "_")] = _value(value)
        i += 1
    return out


def _lora_module(pair: str) -> dict:
    name, eq, path = pair.partition("=")
    if not eq or not name or not path:
        raise typer.BadParameter(f"{pair!r}: give NAME PATH (or NAME=PATH)", param_hint="--lora-modules")
    return {"lora_name": name, "local_path": path}


def _ids(values: list[str] | None) -> list[str] | None:
    """--gpu-idx 0,1 and --gpu-idx 0 --gpu-idx 1 alike -> ["0", "1"] (the client checks they are numbers)."""
    if not values:
        return None
    return [part.strip() for v in values for part in v.split(",") if part.strip()] or None


def launch(
    ctx: typer.Context,
    model_name: Annotated[str, typer.Option("--model-name", "-n", help="A registered model's name.")],
    model_type: Annotated[str, typer.Option("--model-type", "-t")] = "LLM",
    model_path: Annotated[str | None, typer.Option(
        "--model-path", help="Launch the files of this folder or .gguf file (on the worker's host) as the model "
        "NAME: its template, stops and abilities; no registration of their own.")] = None,
    model_format: Annotated[str | None, typer.Option("--model-format", "-f")] = None,
    size_in_billions: Annotated[str | None, typer.Option("--size-in-billions", "-s")] = None,
    quantization: Annotated[str | None, typer.Option("--quantization", "-q")] = None,
    model_uid: Annotated[str | None, typer.Option("--model-uid", "-u")] = None,
    replica: Annotated[int, typer.Option("--replica", "-r")] = 1,
    n_gpu: Annotated[str, typer.Option("--n-gpu", help="auto, 0 (CPU) or 1.")] = "auto",
    gpu_idx: Annotated[list[str] | None, typer.Option(
        "--gpu-idx", help="Pin to these GPUs: 0,1 or repeated.")] = None,
    model_engine: Annotated[str | None, typer.Option(
        "--model-engine", "-en",
        help="transformers or llama.cpp (LLM), sentence_transformers (embedding, rerank).")] = None,
    worker_ip: Annotated[list[str] | None, typer.Option(
        "--worker-ip", "--host", help="Launch on the workers of this host (its name or address; repeatable).")] = None,
    trust_remote_code: Annotated[bool | None, typer.Option(
        "--trust-remote-code/--no-trust-remote-code",
        help="Run the model's own code (only models the operator allows; also --trust-remote-code true|false).",
        show_default=False)] = None,
    device: Annotated[list[str] | None, typer.Option(
        "--device", help="Pin to these workers (e.g. cpu:1, cuda:0).")] = None,
    engine_arg: Annotated[list[str] | None, typer.Option(
        "--engine-arg", help="KEY=VALUE passed to the engine (e.g. max_batch_size=64).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until it is ready.")] = True,
    keep_alive: Annotated[str | None, typer.Option(
        "--keep-alive", help="Unload it after this long idle: 5m, 1h30m, seconds, 0 (after each reply), -1 (never; "
        "the default unless the keep_alive setting says otherwise). Its next request loads it again.")] = None,
    restore: Annotated[bool, typer.Option(
        "--restore/--no-restore",
        help="Load it again when the mesh starts (else it comes back idle-unloaded).")] = True,
    lora_modules: Annotated[list[str] | None, typer.Option(
        "--lora-modules", "-lm", help="A LoRA adapter to load with it: NAME PATH or NAME=PATH (a PEFT folder, a GGUF "
        "LoRA file or a Hub id; repeatable). Requests pick one with lora_name, or model NAME.")] = None,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """Launch a registered model on the best device and print its uid.

    Extra `--name value` pairs are engine options, as with Xinference (e.g. --n_ctx 4096, --max_sequences 32,
    --request_limits 100); each is checked, and an unknown name is refused with the closest valid one."""
    options = {**_extra_options(ctx.args), **_engine_kwargs(engine_arg)}
    if trust_remote_code is not None:
        options["trust_remote_code"] = trust_remote_code
    if lora_modules:
        options["peft_model_config"] = {"lora_list": [_lora_module(pair) for pair in lora_modules]}
    with make_client(endpoint, timeout) as client:
        uid = client.launch_model(
            model_name=model_name, model_type=model_type, model_format=model_format,
            model_size_in_billions=size_in_billions, quantization=quantization, model_uid=model_uid,
            replica=replica, n_gpu=None if n_gpu.lower() == "none" else n_gpu, gpu_idx=_ids(gpu_idx),
            devices=device, model_engine=model_engine, worker_ip=_ids(worker_ip), wait=False, keep_alive=keep_alive,
            restore=restore, model_path=model_path, **options)
        if wait:
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[state]}"),
                          TimeElapsedColumn(), console=console, transient=True,
                          disable=not console.is_terminal) as bar:
                task = bar.add_task(f"launching {uid}", total=1.0, state="launching")

                def show(view):
                    where = f" on {', '.join(view['devices'])}" if view["devices"] else ""
                    bar.update(task, completed=view["progress"],
                               state=f"{view['stage'] or view['state']}{where}")

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
    rows = [[m["model_uid"], m["model_name"] + (f" (from {m['model_path']})" if m.get("model_path") else "")
             + (f" + LoRA {', '.join(x['lora_name'] for x in m['loras'])}" if m.get("loras") else ""),
             m["model_type"], m["model_format"],
             m["model_size_in_billions"] or "", m["quantization"], ", ".join(m["devices"]),
             m["state"] + (f" ({m['error']['message']})" if m["error"] else f" ({m['stage']})" if m["stage"] else "")
             + (f"; restarted {m['restarts']}x, last: {m.get('restart_cause', '')}" if m.get("restarts") else
                f"; {m['restart_cause']}" if m["state"] == "restarting" and m.get("restart_cause") else ""),
             m["queue_depth"], _expiry(m),
             ", ".join(dict.fromkeys(m["hosts"]))] for m in models.values()]
    print_table(["UID", "Name", "Type", "Format", "Size (B)", "Quantization", "Devices", "State", "Queue",
                 "Expires", "Hosts"], rows)


def _expiry(m: dict) -> str:
    """When an instance is unloaded if it stays idle (keep_alive), or since when it is."""
    if m.get("unloaded_at"):
        return "unloaded " + time.strftime("%H:%M:%S", time.localtime(m["unloaded_at"]))
    if m.get("keep_alive") is None:
        return "never"
    if m.get("expires_at") is None:
        return f"{durations.show(m['keep_alive'])} after idle"
    left = m["expires_at"] - time.time()
    return f"in {durations.show(max(0.0, round(left)))}" if left > 0 else "now"


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
    command(app, launch, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    command(app, list_models, "list")
    command(app, describe)
    command(app, terminate)

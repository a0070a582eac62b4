"""The custom-models walk-through of Xinference's docs, on zinfer, with models built here (no downloads).

Starts the mesh (`zinfer up`), builds the tiny models if missing, writes the two definitions of examples/
pointing at them, then registers, lists, launches both formats and the embedding model, generates (streamed),
chats, embeds, terminates, unregisters, and stops the mesh, printing each step.

    .venv/bin/python examples/walkthrough.py [--models DIR] [--keep-running]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def zinfer(*args: str, input: str | None = None) -> str:
    print(f"$ zinfer {shlex.join(args)}" + (f"   <<< {input!r}" if input else ""), flush=True)
    out = subprocess.run([sys.executable, "-m", "zinfer", *args], cwd=REPO, env=os.environ, text=True, input=input,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sys.stdout.write(out.stdout)
    if out.returncode != 0:
        sys.stdout.write(out.stderr)
        raise SystemExit(f"`zinfer {' '.join(args)}` failed with exit code {out.returncode}")
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, default=Path(os.environ.get("ZINFER_MODELS", "~/.zinfer/models-tiny"))
                    .expanduser(), help="where the tiny models live (built if missing)")
    ap.add_argument("--keep-running", action="store_true", help="leave the mesh up at the end")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="zinfer-walkthrough-"))
    try:
        run(args, work)
    finally:
        if not args.keep_running:  # a mesh left running still needs its home
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    # Always a fresh endpoint and home of its own, whatever the user's shell exports: the walk-through must never
    # join (or disturb) a mesh that is already running, nor leave persisted files behind.
    os.environ["ZINFER_ENDPOINT"] = f"tcp://127.0.0.1:{free_port()}"
    os.environ["ZINFER_GATEWAY_PORT"] = str(free_port())
    os.environ["ZINFER_HOME"] = str(work / "home")
    os.environ.pop("ZINFER_CLIENT_KEY", None)
    os.environ.pop("ZINFER_CONFIG", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    step("Build the tiny test models (a Llama in transformers and GGUF form, and MiniLM)")
    zinfer("dev", "make-tiny-models", str(args.models))

    step("Start the mesh: broker, registry, scheduler and one worker per device")
    print(f"$ zinfer up   (endpoint {os.environ['ZINFER_ENDPOINT']}, home {os.environ['ZINFER_HOME']})")
    up = subprocess.Popen([sys.executable, "-m", "zinfer", "up"], cwd=REPO, env=os.environ, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    for line in up.stdout:
        print("   " + line.rstrip())
        if "zinfer is up" in line:
            break
        if time.monotonic() > deadline or up.poll() is not None:
            raise SystemExit("the mesh did not come up")
    try:
        step("Write the custom model definitions (examples/*.json, pointed at the tiny models)")
        files = {}
        for name in ("custom-llama-2", "custom-bge"):
            text = (HERE / f"{name}.json").read_text().replace("{MODELS}", str(args.models.resolve()))
            files[name] = work / f"{name}.json"
            files[name].write_text(text)
            print(f"wrote {files[name]}")

        step("Register them")
        zinfer("register", "--model-type", "LLM", "--file", str(files["custom-llama-2"]), "--persist")
        zinfer("register", "--model-type", "embedding", "--file", str(files["custom-bge"]), "--persist")

        step("List the built-in and custom models")
        zinfer("registrations", "--model-type", "LLM")
        zinfer("registrations", "--model-type", "embedding")

        step("Launch the custom model in both formats, and the embedding model")
        zinfer("launch", "--model-name", "custom-llama-2", "--model-format", "pytorch", "--model-uid", "llama-pt")
        zinfer("launch", "--model-name", "custom-llama-2", "--model-format", "ggufv2", "--quantization", "F16",
               "--model-uid", "llama-gguf")
        zinfer("launch", "--model-name", "custom-bge", "--model-type", "embedding")
        zinfer("list")

        step("Generate (streamed; the tiny model's words are random)")
        zinfer("generate", "--model-uid", "llama-pt", "--max-tokens", "24", "--temperature", "0",
               "What is the largest animal in the world?")
        zinfer("generate", "--model-uid", "llama-gguf", "--max-tokens", "24", "--temperature", "0",
               "What is the largest animal in the world?")

        step("Chat (the history is kept between turns)")
        zinfer("chat", "--model-uid", "llama-gguf", "--max-tokens", "12", "--temperature", "0",
               input="Hello!\nTell me about whales.\n\n")

        step("Embed")
        zinfer("embed", "--model-uid", "custom-bge", "The blue whale is the largest animal.", "Octopuses have "
               "three hearts.")

        step("The same from Python")
        from zinfer.shared.client import Client

        client = Client()
        model = client.get_model("llama-pt")
        completion = model.generate("What is the largest animal in the world?",
                                    {"max_tokens": 8, "temperature": 0})
        print({k: completion[k] for k in ("id", "object", "model", "usage")})
        embedding = client.get_model("custom-bge").create_embedding("hello")
        print(f"embedding: {len(embedding['data'][0]['embedding'])} dimensions, usage {embedding['usage']}")
        client.close()

        step("The services' logs")
        zinfer("logs", "scheduler", "-n", "4")

        step("Terminate and unregister")
        for uid in ("llama-pt", "llama-gguf", "custom-bge"):
            zinfer("terminate", "--model-uid", uid)
        zinfer("list")
        zinfer("unregister", "--model-type", "LLM", "--model-name", "custom-llama-2")
        zinfer("unregister", "--model-type", "embedding", "--model-name", "custom-bge")
        print("\nwalk-through complete")
    finally:
        if not args.keep_running:
            step("Stop the mesh")
            try:
                zinfer("down")
                up.wait(timeout=30)
            except (SystemExit, subprocess.TimeoutExpired):
                os.killpg(up.pid, signal.SIGINT)  # as Ctrl-C to `zinfer up`
                up.wait(timeout=30)
            print(f"zinfer up exited with {up.returncode}")


if __name__ == "__main__":
    main()

"""The web UI: plain HTML, CSS and JavaScript modules from the package (services/gateway/ui/), served at `/` by
the gateway, and the endpoints it needs besides the public API (who the key is, the cluster, a registration filled in
from files).

The page is one more client of the HTTP API: it signs in with an API key (kept in the browser's session
storage, sent as `Authorization: Bearer`), and every call it makes is one a script could make. Its files are
read once at start; a file that is missing from the install answers with a page that says so (never a blank
page). Every response of the UI carries a Content-Security-Policy that allows scripts, styles and connections
to this origin only: no inline script, no eval, nothing from elsewhere.
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from zinfer.services.gateway.asgi import body_of
from zinfer.services.registry import catalog
from zinfer.shared import fromfiles
from zinfer.shared import protocol as p
from zinfer.shared.errors import Forbidden, InvalidRequest

UI_DIR = Path(__file__).resolve().parent / "ui"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; media-src 'self' blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8"}


def load_files(folder: Path = UI_DIR) -> dict[str, bytes]:
    """The UI's files by name (no sub-folders: a request names one of these, never a path)."""
    if not folder.is_dir():
        return {}
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file() and f.suffix in TYPES}


def asset(files: dict[str, bytes], name: str) -> Response:
    body = files.get(name)
    if body is None:
        missing = "index.html" if name == "index.html" else name
        text = (f"zinfer's web UI file {missing!r} is not in this install ({UI_DIR}). The HTTP API works "
                "without it; reinstall zinfer to get the UI back.")
        return Response(text, status_code=404 if name != "index.html" else 500, headers=HEADERS,
                        media_type="text/plain; charset=utf-8")
    return Response(body, headers=HEADERS, media_type=TYPES[Path(name).suffix])


def install(app: FastAPI, gateway) -> None:
    files = load_files()

    @app.get("/", include_in_schema=False)
    async def index():
        return asset(files, "index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_file(name: str):
        return asset(files, name)

    async def caller_of(request: Request) -> p.Caller:
        """Who the request's key is, as the broker stamps it (its answer to a Ping)."""
        status = await gateway.call(request, p.BROKER_TARGET, p.Ping())
        return p.parse_caller(status.caller.encode())

    @app.get("/v1/whoami")
    async def whoami(request: Request):
        """The key this request is made with, as the mesh knows it: {"name", "role"} (user or admin)."""
        caller = await caller_of(request)
        return JSONResponse({"name": caller.principal, "role": caller.role})

    @app.get("/v1/prompt_styles")
    async def prompt_styles():
        """The built-in prompt styles a registration may name (`prompt_style`), with their templates. They ship
        with the package (configs/prompt_styles.json), the same on every host, so the gateway reads its own."""
        return JSONResponse([msgspec.to_builtins(style) for style in catalog.prompt_styles().values()])

    @app.post("/v1/registration_from_files")
    async def registration_from_files(request: Request):
        """A registration filled in from model files (admin keys: it reads this host's disk, or the Hub): body
        {"model_path"} (a folder or .gguf file on the gateway's host) or {"model_id", "model_revision"} (a Hub
        repository: its config and tokenizer files only), with optional "model_type" and "model_name". Answers
        {"model_type", "model"}: Xinference's version 2 JSON, for the person to review before registering."""
        if (await caller_of(request)).role != p.ADMIN:
            raise Forbidden("filling a registration in from files needs an admin key", field="authorization")
        body = await body_of(request)
        path, repo = body.get("model_path"), body.get("model_id")
        has_path, has_repo = isinstance(path, str) and bool(path.strip()), isinstance(repo, str) and bool(repo.strip())
        if has_path == has_repo:
            raise InvalidRequest("give model_path (a model folder or GGUF file) or model_id (a Hub repository), "
                                 "one of them", field="model_path")
        model_type, name = body.get("model_type") or None, body.get("model_name") or None
        if has_path:
            work = partial(fromfiles.registration_from_path, path.strip(), model_type, name)
        else:
            work = partial(fromfiles.registration_from_hub, repo.strip(), model_type, name,
                           body.get("model_revision") or None)
        kind, model = await asyncio.to_thread(work)
        return JSONResponse({"model_type": kind, "model": model})

    @app.get("/v1/cluster/workers")
    async def workers(request: Request):
        """Every worker the scheduler hears from: its device, host, address, free and total memory (bytes)."""
        reply = await gateway.call(request, p.SCHEDULER, p.SchedulerStatus())
        return JSONResponse({"workers": [msgspec.to_builtins(w) for w in reply.workers],
                             "instances": reply.instances})

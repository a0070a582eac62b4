"""The gateway's ASGI pieces under FastAPI: server-sent events that cancel on a disconnect, the fast path for the
inference routes, and the request metrics middleware."""

from __future__ import annotations

import asyncio
import time

import msgspec
import structlog
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from zinfer.services.gateway.metrics import Metrics
from zinfer.shared.errors import InvalidRequest, ZinferError

log = structlog.get_logger()
_decoder = msgspec.json.Decoder()


async def body_of(request: Request) -> dict:
    raw = await request.body()
    try:
        body = _decoder.decode(raw) if raw else {}
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


class EventStream(Response):
    """Server-sent events from an async iterator of ready-made `data: ...` frames. Starlette's StreamingResponse
    runs each stream in an anyio task group to notice a disconnect (a quarter of the gateway's time on short
    streams); here one asyncio task waits for the disconnect and cancels the stream, whose iterator then closes
    (which cancels the generation on the worker)."""

    media_type = "text/event-stream"

    def __init__(self, events, media_type: str | None = None):  # another media type: a body streamed as made
        self.events = events
        if media_type is not None:
            self.media_type = media_type
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.current_task()
        gone = False

        async def watch():
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            streaming.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
                if gone:  # the watcher's cancel lands at the next wait, but queued chunks need none and uvicorn's
                    return  # send() drops them silently once the client is gone: stop here, not when they run out
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
        except OSError:  # the connection closed under a send
            pass
        finally:
            watcher.cancel()
            await self.events.aclose()


class FastPath:
    """The inference routes (POST completions, chat completions, embeddings) straight to their handlers, in front
    of FastAPI: its stack of about ten ASGI layers (several wrapping every chunk's send) cost ~0.3 ms a request
    here, on the path where every millisecond shows. Same handlers, same errors, same metrics; FastAPI still
    declares these routes (OpenAPI) and serves everything else."""

    def __init__(self, app, gateway, routes: dict, error_response):
        self.app = app
        self.gateway = gateway
        self.routes = routes
        self.error_response = error_response


    async def __call__(self, scope, receive, send):
        handler = self.routes.get(scope.get("path")) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        metrics = self.gateway.metrics
        try:
            response = await handler(Request(scope, receive))
        except ZinferError as exc:
            metrics.error(exc)
            response = self.error_response(exc)
        except Exception:
            log.exception("request_failed", route=scope["path"])
            response = JSONResponse({"error": {"message": "internal error", "type": "server_error", "param": None,
                                               "code": "internal"}, "detail": "internal error"}, status_code=500)
        metrics.request(scope["path"], "POST", response.status_code, time.perf_counter() - start)
        await response(scope, receive, send)


class Measure:
    """Requests by route and status, and time to the response's first byte (a plain ASGI middleware: Starlette's
    BaseHTTPMiddleware costs a task group per request)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def measured_send(message):
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.request(route, scope["method"], message["status"], time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, measured_send)

"""The HTTP gateway: OpenAI's and Xinference's REST APIs over the bus, as an ASGI app (FastAPI).

Every request acts on the bus as its caller (services/gateway/bus.py): `Authorization: Bearer <API key>`, the
caller's own CURVE key. Without one the answer is 401, unless the settings say `gateway_auth = false`: then
the gateway acts with this home's `user` key, never an admin's. Bodies are decoded with msgspec into the same
structs the bus carries (shared/compat.py takes OpenAI's and Xinference's spellings); replies are encoded
straight to JSON. Errors are OpenAI error objects with the HTTP status of their type, and carry `detail` too
(what Xinference's client reads). A streaming client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from zinfer.services.gateway import agents, audio, ui
from zinfer.services.gateway.asgi import EventStream, FastPath, Measure, body_of
from zinfer.services.gateway.bus import Bus, Connection
from zinfer.services.gateway.metrics import Metrics
from zinfer.shared import compat, durations, keys
from zinfer.shared import protocol as p
from zinfer.shared.buscore import (
    DESCRIBE,
    LAUNCH_POLL_S,
    WAKE,
    WAKES,
    adrive,
    as_plain,
    embedding_array,
    embedding_result,
    launch_done,
    recover,
    rerank_result,
    view_plain,
)
from zinfer.shared.config import Settings
from zinfer.shared.errors import (
    InvalidRequest,
    Unauthenticated,
    ZinferError,
)
from zinfer.shared.images import ImagePolicy
from zinfer.shared.payloads import Usage

STATUS = {"invalid": 400, "protocol": 400, "not_found": 404, "conflict": 409, "state": 503, "too_large": 413,
          "forbidden": 403, "unauthenticated": 401, "queue_full": 429, "unavailable": 503, "no_route": 503,
          "timeout": 504, "cancelled": 499, "storage": 507, "internal": 500}
OPENAI_TYPE = {400: "invalid_request_error", 404: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               429: "rate_limit_error"}
log = structlog.get_logger()
_json = msgspec.json.Encoder()


def error_response(exc: ZinferError) -> JSONResponse:
    status = STATUS.get(exc.code, 500)
    body = {"error": {"message": str(exc), "type": OPENAI_TYPE.get(status, "server_error"), "param": exc.field,
                      "code": exc.code}, "detail": str(exc)}
    if exc.problems:  # every field at fault (a definition can have several), for forms to show each by its field
        body["error"]["problems"] = [{"field": f.field, "message": f.message} for f in exc.problems]
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def json_response(obj: Any) -> Response:
    return Response(_json.encode(obj), media_type="application/json")


def plain(msg: p.Msg) -> dict:
    """A reply struct as OpenAI's JSON object: every field present, no internal tag."""
    return as_plain(msg)


def required(body: dict, name: str, kind: type | tuple) -> Any:
    value = body.get(name)
    if value is None:
        raise InvalidRequest(f"{name} is required", field=name)
    if not isinstance(value, kind):
        raise InvalidRequest(f"{name} must be {getattr(kind, '__name__', kind)}", field=name)
    return value


class Gateway:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.timeout = settings.request_timeout
        self.images = ImagePolicy.from_settings(settings)
        self.broker_key = keys.broker_public_key(settings.home_path)
        self.own_key = keys.load_client_key(settings.home_path, settings.client_key or
                                            str(keys.client_key_path(settings.home_path, "user")))
        self.bus: Bus | None = None
        self.metrics = Metrics()
        self._uids: set[str] = set()
        self._uids_at = 0.0
        self._loras: dict[str, list[str]] = {}  # each launched model's LoRA adapters, by uid

    def _remember(self, models) -> None:
        """The launched uids and their adapters (a request's `model` may name either), as of now."""
        self._uids, self._uids_at = {m.model_uid for m in models}, time.monotonic()
        self._loras = {m.model_uid: [x.lora_name for x in m.info.loras] for m in models if m.info.loras}

    def _adapter_of(self, name: str) -> tuple[str, str] | None:
        """(uid, adapter) that a request's `model` names from what is known now: `UID:ADAPTER`, or an ADAPTER name
        one launched model holds; None when it names no loaded adapter (two holders: a 400 asking for UID:)."""
        uid, colon, adapter = name.rpartition(":")
        if colon and adapter in self._loras.get(uid, []):
            return uid, adapter
        holders = [u for u, held in self._loras.items() if name in held]
        if len(holders) > 1:
            raise InvalidRequest(f"model {name!r}: LoRA adapter of {', '.join(sorted(holders))}; name one as "
                                 f"UID:{name}", field="model")
        return (holders[0], name) if holders else None

    def _to_adapter(self, name: str, body: dict) -> str:
        """The uid a `model` naming an adapter goes to, with lora_name set in the body; `name` itself when it
        names none (a uid or a registration); a 400 for UID:ADAPTER of a model without that adapter."""
        found = self._adapter_of(name)
        if found is None:
            uid, colon, adapter = name.rpartition(":")
            if colon and uid in self._uids:
                raise InvalidRequest(f"model {name!r}: {uid} has no LoRA adapter {adapter!r} (loaded: "
                                     f"{', '.join(self._loras.get(uid, [])) or 'none'})", field="model")
            return name
        uid, adapter = found
        if body.get("lora_name") not in (None, adapter):
            raise InvalidRequest(f"lora_name {body['lora_name']!r} and model {name!r} name different adapters",
                                 field="lora_name")
        body["lora_name"] = adapter
        return uid

    # ------------------------------------------------------------------ callers

    def connection(self, request: Request) -> Connection:
        header = request.headers.get("authorization")
        if not header and request.headers.get("x-api-key"):  # Anthropic's clients send the key this way
            header = f"Bearer {request.headers['x-api-key']}"
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("Authorization must be `Bearer <API key>`")
            return self.bus.connection(self.bus.api_key(token, self.broker_key))
        if not self.settings.gateway_auth:
            return self.bus.connection(self.own_key)
        raise Unauthenticated("an API key is required (Authorization: Bearer zk-...); `zinfer keys create NAME` "
                              "makes one")

    async def model_target(self, conn: Connection, body: dict) -> tuple[str, str]:
        """(uid, bus target) of the request's `model`: a launched uid; else a registered model's name, loaded on
        request (for the roles load_on_request_roles names; the scheduler checks), which the request waits for.
        Neither: a 404 at once (not after the broker's grace period). A `keep_alive` in the body (Ollama's) is
        taken off it and applied (for the roles keep_alive_roles names)."""
        uid = body.get("model")
        if not isinstance(uid, str) or not uid:
            raise InvalidRequest("model is required (a launched model's uid)", field="model")
        if time.monotonic() - self._uids_at > 5 or (uid not in self._uids and self._adapter_of(uid) is None):
            reply, _ = await conn.call(p.SCHEDULER, p.ListModels(), self.timeout)
            self._remember(reply.models)
        if uid not in self._uids:
            uid = self._to_adapter(uid, body)
            if uid not in self._uids:
                reply, _ = await conn.call(p.SCHEDULER, p.WakeModel(model_name=uid), self.settings.launch_timeout)
                uid = body["model"] = reply.model_uid
                await self.wait_ready(conn, uid)
                self._uids.add(uid)
        if "keep_alive" in body:
            seconds = durations.parse(body.pop("keep_alive"))
            await conn.call(p.SCHEDULER, p.KeepAlive(model_uid=uid, keep_alive=durations.FOREVER if seconds is None
                                                     else seconds), self.timeout)
        return uid, p.model_target(uid)

    async def wait_ready(self, conn: Connection, uid: str) -> None:
        """Wait for a launch or a load on request; a failed one raises its typed error."""
        deadline = time.monotonic() + self.settings.launch_timeout
        while True:
            view = (await conn.call(p.SCHEDULER, p.DescribeModel(model_uid=uid), self.timeout))[0].model
            if launch_done(uid, view, time.monotonic() > deadline, self.settings.launch_timeout):
                return
            await asyncio.sleep(LAUNCH_POLL_S)

    async def recover(self, conn: Connection, uid: str, exc: ZinferError, attempt: int) -> None:
        """The bus core's recover() policy (as the Python client drives it): returns when the request should go
        again (its unloaded instance was loaded on request), else raises the error, explained."""
        async def perform(step: str):
            if step == DESCRIBE:
                return (await conn.call(p.SCHEDULER, p.DescribeModel(model_uid=uid), self.timeout))[0].model
            if step == WAKE:
                return await conn.call(p.SCHEDULER, p.WakeModel(model_uid=uid), self.timeout)
            return await self.wait_ready(conn, uid)

        error = await adrive(recover(uid, exc, attempt, "model"), perform)
        if error is not None:
            raise error from None

    async def ask(self, conn: Connection, target: str, uid: str, msg: p.Msg):
        """(reply, buffers) of one request; an unloaded instance is loaded on request first."""
        for attempt in range(WAKES + 1):
            try:
                return await conn.call(target, msg, self.timeout)
            except ZinferError as exc:
                await self.recover(conn, uid, exc, attempt)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ inference

    async def chat_request(self, uid: str, body: dict) -> p.Chat:
        """compat.chat_request under this gateway's image policy; off the event loop when an image part may have
        to be fetched or decoded."""
        messages = body.get("messages")
        if isinstance(messages, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) and any(
                isinstance(part, dict) and part.get("type") == "image_url" for part in m["content"])
                for m in messages):
            return await asyncio.to_thread(compat.chat_request, uid, body, self.images)
        return compat.chat_request(uid, body, self.images)

    async def completions(self, request: Request, chat: bool) -> Response:
        conn = self.connection(request)
        body = await body_of(request)
        uid, target = await self.model_target(conn, body)
        body.pop("model")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if chat:
            msg: p.Msg = await self.chat_request(uid, body)
        else:
            prompt = required(body, "prompt", (str, list))
            body.pop("prompt")
            if isinstance(prompt, list):
                if len(prompt) != 1 or not isinstance(prompt[0], str):
                    raise InvalidRequest("prompt must be one string (or a list of one string)", field="prompt")
                prompt = prompt[0]
            msg = p.Generate(model_uid=uid, prompt=prompt, config=compat.generate_config(body))
        answer = await self.answer(conn, target, uid, msg)
        if not msg.config.stream:
            return json_response(plain(answer))
        return EventStream(self._sse(uid, *answer, include_usage))

    async def answer(self, conn: Connection, target: str, uid: str, msg: p.Generate | p.Chat):
        """The reply of a generation (counted in the metrics), or, streamed, (first chunk, the rest)."""
        if msg.config.stream:
            return await self.open_stream(conn, target, uid, msg)
        reply, _ = await self.ask(conn, target, uid, msg)
        self.metrics.tokens(uid, reply.usage)
        return reply

    async def open_stream(self, conn: Connection, target: str, uid: str, msg: p.Msg):
        """(first chunk, the rest) of a stream; errors before the first chunk raise (their own HTTP status), an
        unloaded instance is loaded on request first."""
        for attempt in range(WAKES + 1):
            chunks = conn.stream(target, msg, self.timeout)
            try:
                return await chunks.__anext__(), chunks
            except StopAsyncIteration:
                return None, chunks
            except ZinferError as exc:
                await chunks.aclose()
                await self.recover(conn, uid, exc, attempt)
        raise AssertionError("unreachable")

    async def render_chat(self, request: Request) -> Response:
        """POST /v1/chat/render: the prompt a chat request's messages and tools make, and its token ids."""
        conn = self.connection(request)
        body = await body_of(request)
        uid, target = await self.model_target(conn, body)
        body.pop("model")
        chat = await self.chat_request(uid, body)
        reply, _ = await self.ask(conn, target, uid, p.RenderChat(model_uid=uid, messages=chat.messages,
                                                                  options=chat.options))
        return json_response(plain(reply))

    async def _sse(self, uid: str, first, chunks, include_usage: bool):
        usage = None
        last = None
        try:
            chunk = first
            while chunk is not None:
                if chunk.usage is not None:
                    usage = chunk.usage
                data = plain(chunk)
                data["usage"] = None  # OpenAI: usage travels in a chunk of its own, when asked for
                last = data
                yield b"data: " + _json.encode(data) + b"\n\n"
                chunk = await anext(chunks, None)
            if include_usage and usage is not None and last is not None:
                tail = {k: last[k] for k in ("id", "object", "created", "model")}
                tail.update(choices=[], usage=as_plain(usage))
                yield b"data: " + _json.encode(tail) + b"\n\n"
            yield b"data: [DONE]\n\n"
            self.metrics.tokens(uid, usage)
        except ZinferError as exc:  # mid-stream: the status is sent already, the error goes as an event
            self.metrics.error(exc)
            yield b"data: " + _json.encode({"error": {"message": str(exc), "type": "server_error",
                                                      "param": exc.field, "code": exc.code}}) + b"\n\n"
        finally:
            await chunks.aclose()  # a client that went away cancels its generation on the worker

    async def embeddings(self, request: Request) -> Response:
        conn = self.connection(request)
        body = await body_of(request)
        uid, target = await self.model_target(conn, body)  # an unknown uid: 404 before the body's checks
        typed = compat.embeddings_body(body)
        texts, encoding = typed.input, typed.encoding_format
        reply, buffers = await self.ask(conn, target, uid, p.Embed(model_uid=uid, input=texts,
                                                                   dimensions=typed.dimensions))
        self.metrics.tokens(uid, Usage(prompt_tokens=reply.prompt_tokens, completion_tokens=0,
                                         total_tokens=reply.prompt_tokens))
        return json_response(embedding_result(uid, reply, embedding_array(reply, buffers), encoding))

    async def rerank(self, request: Request) -> Response:
        """Xinference's POST /v1/rerank (Cohere's and Jina's fields where they match; /v2/rerank too)."""
        conn = self.connection(request)
        body = await body_of(request)
        uid, target = await self.model_target(conn, body)
        typed = compat.rerank_body(body)
        reply, _ = await self.ask(conn, target, uid, typed.message())
        self.metrics.tokens(typed.model, Usage(prompt_tokens=reply.input_tokens, completion_tokens=0,
                                               total_tokens=reply.input_tokens))
        return json_response(rerank_result(reply, typed.texts, typed.return_documents, typed.return_len))

    # ------------------------------------------------------------------ models (OpenAI list, Xinference REST)

    async def call(self, request: Request, target: str, msg: p.Msg, timeout: float | None = None) -> p.Msg:
        reply, _ = await self.connection(request).call(target, msg, timeout or self.timeout)
        return reply

    async def list_models(self, request: Request) -> Response:
        """Launched models, then their LoRA adapters as vLLM lists them (`parent`: the uid; `root`: the files),
        under the name a request's `model` takes (UID:ADAPTER where two models hold one name)."""
        reply = await self.call(request, p.SCHEDULER, p.ListModels())
        self._remember(reply.models)
        data = [{"id": m.model_uid, "object": "model", "created": 0, "owned_by": "zinfer", **view_plain(m)}
                for m in reply.models]
        names = [x.lora_name for m in reply.models for x in m.info.loras]
        data += [{**base, "id": x.lora_name if names.count(x.lora_name) == 1 else f"{m.model_uid}:{x.lora_name}",
                  "parent": m.model_uid, "root": x.local_path}
                 for m, base in zip(reply.models, data, strict=False) for x in m.info.loras]
        return json_response({"object": "list", "data": data})

    async def load_lora_adapter(self, request: Request) -> Response:
        """vLLM's POST /v1/load_lora_adapter ({"lora_name", "lora_path"}), with `model`: the uid to load it into
        (may be left out while one LLM is launched); `lora_scale` for llama.cpp."""
        body = await body_of(request)
        uid = await self._lora_uid(request, body, None)
        lora = compat.lora_adapter({"lora_name": required(body, "lora_name", str),
                                    "local_path": required(body, "lora_path", str),
                                    **({"lora_scale": body["lora_scale"]} if "lora_scale" in body else {})})
        reply = await self.call(request, p.SCHEDULER, p.LoadLora(model_uid=uid, lora=lora),
                                self.settings.launch_timeout)
        self._uids_at = 0.0
        return Response(reply.message, media_type="text/plain")

    async def unload_lora_adapter(self, request: Request) -> Response:
        """vLLM's POST /v1/unload_lora_adapter ({"lora_name"}; `model` where two models hold that name)."""
        body = await body_of(request)
        name = required(body, "lora_name", str)
        uid = await self._lora_uid(request, body, name)
        reply = await self.call(request, p.SCHEDULER, p.UnloadLora(model_uid=uid, lora_name=name))
        self._uids_at = 0.0
        return Response(reply.message, media_type="text/plain")

    async def _lora_uid(self, request: Request, body: dict, adapter: str | None) -> str:
        if body.get("model") is not None:
            return required(body, "model", str)
        models = (await self.call(request, p.SCHEDULER, p.ListModels())).models
        fits = [m.model_uid for m in models if m.info.model_type == "LLM"
                and (adapter is None or adapter in [x.lora_name for x in m.info.loras])]
        if len(fits) != 1:
            raise InvalidRequest(f"model: {len(fits)} launched LLMs {'hold that adapter' if adapter else 'run'}; "
                                 "say which with model (its uid)", field="model")
        return fits[0]

    async def describe(self, request: Request, model_uid: str) -> Response:
        reply = await self.call(request, p.SCHEDULER, p.DescribeModel(model_uid=model_uid))
        return json_response({"id": model_uid, **view_plain(reply.model)})

    async def launch(self, request: Request) -> Response:
        body = await body_of(request)
        model_name = required(body, "model_name", str)
        body.pop("model_name")
        wait = request.query_params.get("wait_ready", "true").lower() not in ("false", "0", "no")
        msg = compat.launch_request(model_name, **body)
        conn = self.connection(request)
        reply, _ = await conn.call(p.SCHEDULER, msg, self.timeout)
        uid = reply.model_uid
        if wait:
            await self.wait_ready(conn, uid)
        self._uids.add(uid)
        return json_response({"model_uid": uid})

    async def terminate(self, request: Request, model_uid: str) -> Response:
        await self.call(request, p.SCHEDULER, p.TerminateModel(model_uid=model_uid), self.settings.launch_timeout)
        self._uids.discard(model_uid)
        return json_response({})

    async def register(self, request: Request, model_type: str) -> Response:
        body = await body_of(request)
        model = required(body, "model", (str, dict))
        if body.get("worker_ip") is not None:
            raise InvalidRequest("worker_ip: definitions are registered once for the whole mesh", field="worker_ip")
        text = model if isinstance(model, str) else msgspec.json.encode(model).decode()
        await self.call(request, p.REGISTRY, p.RegisterModel(model_type=model_type, model=text,
                                                             persist=bool(body.get("persist", False)),
                                                             force=bool(body.get("force", False))))
        return json_response({})

    async def registrations(self, request: Request, model_type: str) -> Response:
        reply = await self.call(request, p.REGISTRY, p.ListRegistrations(model_type=model_type))
        return json_response([plain(item) for item in reply.items])

    async def registration(self, request: Request, model_type: str, model_name: str) -> Response:
        reply = await self.call(request, p.REGISTRY, p.GetRegistration(model_type=model_type, model_name=model_name))
        return json_response(reply.definition)

    async def unregister(self, request: Request, model_type: str, model_name: str) -> Response:
        await self.call(request, p.REGISTRY, p.UnregisterModel(model_type=model_type, model_name=model_name))
        return json_response({})

    # ------------------------------------------------------------------ operations

    async def ready(self) -> Response:
        conn = self.bus.connection(self.own_key)
        try:
            status, _ = await conn.call(p.BROKER_TARGET, p.Ping(), 2.0)
        except ZinferError as exc:
            return JSONResponse({"ready": False, "broker": False, "detail": str(exc)}, status_code=503)
        services = {peer.service for peer in status.peers}
        parts = {"broker": True, "registry": p.REGISTRY in services, "scheduler": p.SCHEDULER in services,
                 "workers": sorted(s for s in services if s.startswith("worker/") and not p.is_instance_service(s))}
        ok = parts["registry"] and parts["scheduler"]
        return JSONResponse({"ready": ok, **parts}, status_code=200 if ok else 503)

    async def metrics_text(self, request: Request) -> Response:
        reply = await self.call(request, p.SCHEDULER, p.ListModels())
        return Response(self.metrics.render(reply.models), media_type=self.metrics.content_type)


def _endpoint(handler):
    """A FastAPI endpoint for a handler that takes the request (FastAPI reads the parameter's annotation)."""
    async def endpoint(request: Request):
        return await handler(request)
    return endpoint


def create_app(settings: Settings) -> FastPath:
    gw = Gateway(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        gw.bus = Bus(settings)  # in the server's event loop
        yield
        gw.bus.close()

    app = FastAPI(title="zinfer gateway", version="1", lifespan=lifespan,
                  description="OpenAI- and Xinference-compatible REST API over a zinfer mesh. "
                  "Authorization: Bearer <API key> (`zinfer keys create NAME` prints one).")
    app.state.gateway = gw

    @app.exception_handler(ZinferError)
    async def zinfer_error(request: Request, exc: ZinferError):
        gw.metrics.error(exc)
        return error_response(exc)

    app.add_middleware(Measure, metrics=gw.metrics)

    @app.get("/health", include_in_schema=True)
    async def health():
        return {"status": "ok"}

    @app.get("/v1/cluster/auth")
    async def cluster_auth():
        """Whether requests need an API key (Xinference's client asks this first)."""
        return {"auth": settings.gateway_auth}

    # The inference routes: one table, declared to FastAPI (OpenAPI) and served by FastPath in front of it.
    inference = {
        "/v1/completions": lambda r: gw.completions(r, chat=False),
        "/v1/chat/completions": lambda r: gw.completions(r, chat=True),
        "/v1/responses": lambda r: agents.responses(gw, r), "/v1/messages": lambda r: agents.messages(gw, r),
        "/v1/embeddings": gw.embeddings, "/v1/rerank": gw.rerank,
        "/v2/rerank": gw.rerank,  # Cohere's v2 path for the same call
        "/v1/audio/transcriptions": lambda r: audio.transcriptions(gw, r),
        "/v1/audio/translations": lambda r: audio.transcriptions(gw, r, task="translate"),
        "/v1/audio/speech": lambda r: audio.speech(gw, r),
    }
    for path, handler in inference.items():
        app.add_api_route(path, _endpoint(handler), methods=["POST"], name=path.strip("/").replace("/", "_"))

    # The rest, on Xinference's paths: each served by the Gateway method named here (FastAPI reads the path
    # parameters from its signature).
    for method, path, handler in (
            ("GET", "/ready", gw.ready), ("GET", "/metrics", gw.metrics_text),
            ("POST", "/v1/chat/render", gw.render_chat),
            ("POST", "/v1/load_lora_adapter", gw.load_lora_adapter),
            ("POST", "/v1/unload_lora_adapter", gw.unload_lora_adapter),
            ("GET", "/v1/models", gw.list_models), ("POST", "/v1/models", gw.launch),
            ("GET", "/v1/models/{model_uid}", gw.describe), ("DELETE", "/v1/models/{model_uid}", gw.terminate),
            ("POST", "/v1/model_registrations/{model_type}", gw.register),
            ("GET", "/v1/model_registrations/{model_type}", gw.registrations),
            ("GET", "/v1/model_registrations/{model_type}/{model_name}", gw.registration),
            ("DELETE", "/v1/model_registrations/{model_type}/{model_name}", gw.unregister)):
        app.add_api_route(path, handler, methods=[method], name=handler.__name__)

    ui.install(app, gw)  # the web UI at /, and the endpoints only it needs
    return FastPath(app, gw, inference, error_response)

"""The FastAPI app over any ``Engine``: OpenAI-compatible routes, /health,
/metrics, vLLM's /tokenize and /detokenize (vLLM's benchmark client uses them),
and /v1/prefixes (pinned prefixes of the prefix cache).

``create_app(engine, api_key=None, allowed_origins=None)`` (CORS for those
origins); the app starts the engine in its lifespan
(in uvicorn's event loop) and shuts it down with it. ``api_key`` may be one key
or several: each key is its own prefix-cache namespace. The key is checked, and
the body's size bounded (``max_request_body``, 413), before the body is read.
If the engine dies, ``on_engine_death`` is called (the CLI stops the server and
exits non-zero, so a supervisor restarts it).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel

from statex_serve import __version__
from statex_serve.api.chat import ChatEndpoint, message_chars, render_chat
from statex_serve.api.completions import CompletionsEndpoint
from statex_serve.api.errors import APIError, install_error_handlers
from statex_serve.api.generation import check_model, check_prompt_chars, max_token_chars
from statex_serve.api.metrics import Metrics
from statex_serve.api.prefixes import PrefixesEndpoint
from statex_serve.api.schemas import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, PrefixCreateRequest, TokenizeRequest,
)
from statex_serve.engine.base import Engine

logger = logging.getLogger(__name__)

# 32 MiB: a 1M-token prompt as text (~4 MiB) or as token ids (~7 MiB) with room to spare.
DEFAULT_MAX_REQUEST_BODY = 32 << 20
# Routes that need the API key (when one is set): everything but /health, /metrics, /version and the docs.
_PROTECTED = ("/v1/", "/tokenize", "/detokenize")

_COUNTED = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/prefixes", "/tokenize", "/detokenize",
            "/health")


class _CountRequests:
    """Pure ASGI middleware: counts requests by endpoint and status (a pure one,
    because Starlette's BaseHTTPMiddleware gets in the way of streaming and of
    noticing disconnects)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = next((p for p in _COUNTED if path == p or path.startswith(p + "/")), "other")
        status = {"code": 500}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, what every non-2xx answer carries."""
    error: ErrorDetail


_ERROR_DOCS = {
    400: "Invalid request: a malformed body, a value out of range, a prompt too long for the context",
    401: "Missing or wrong API key",
    404: "Unknown model or prefix id",
    413: "The request body is larger than --max-request-body",
    500: "The engine failed while running this request (the message carries an id to find it in the log)",
    503: "The server is at capacity (with Retry-After), the engine is not running, or it looks hung",
}


# with "stream": true the answer is server-sent events
_STREAM = {200: {"description": "The completion (JSON), or with stream: true its chunks as server-sent events",
                 "content": {"text/event-stream": {}}}}


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorResponse, "description": _ERROR_DOCS[c]} for c in codes}


def _openapi_without_422(app: FastAPI):
    """Validation errors answer 400 with the OpenAI error body (``errors.py``),
    so the schema should not promise FastAPI's 422."""
    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema
    return openapi


def key_namespace(key: str) -> str:
    """A key's prefix-cache namespace: a digest, so the key itself is kept nowhere else."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


async def _send_error(send, err: APIError) -> None:
    response = err.response()
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class _Gate:
    """Pure ASGI middleware in front of the routes: the API key first (from the
    header, before a byte of the body is read), then the body, read here up to
    ``max_body`` bytes (413 beyond, without reading the rest) and replayed to
    the app. Sets ``request.state.cache_owner`` (the key's namespace)."""

    def __init__(self, app, keys: dict[bytes, str], max_body: int):
        self.app = app
        self.keys = keys          # key bytes -> namespace
        self.max_body = max_body

    def _owner(self, scope) -> str | None | bool:
        """The caller's namespace; None without keys; False for a wrong or missing key."""
        if not self.keys:
            return None
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        found = False
        for key, namespace in self.keys.items():    # every key compared, in constant time each
            if hmac.compare_digest(token, key) and scheme.lower() == b"bearer":
                found = namespace
        return found

    async def __call__(self, scope, receive, send):
        """401 or 413 before the routes see the request; else the body, replayed."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path.startswith(_PROTECTED):
            owner = self._owner(scope)
            if owner is False:
                return await _send_error(send, APIError(
                    401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
            scope.setdefault("state", {})["cache_owner"] = owner
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"The request body is larger than this server's limit of {self.max_body} bytes "
                                "(--max-request-body).", code="request_too_large")
        length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _send_error(send, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _send_error(send, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()      # then what follows: a disconnect

        return await self.app(scope, replay, send)


def create_app(engine: Engine, api_key: str | Sequence[str] | None = None, *,
               max_request_body: int = DEFAULT_MAX_REQUEST_BODY, default_max_tokens: int | None = None,
               on_engine_death: Callable[[], None] | None = None,
               allowed_origins: Sequence[str] | None = None) -> FastAPI:
    """The app over ``engine``: middleware, then the routes (see the module docstring)."""
    keys = [api_key] if isinstance(api_key, str) else [k for k in (api_key or ()) if k]
    metrics = Metrics(engine)
    # /docs and /redoc with Swagger UI's and ReDoc's files served from the package
    # (FastAPI's default loads them from a CDN: a blank page without the internet)
    app = FastAPIOffline(title="statex-serve", version=__version__, lifespan=_lifespan(engine, on_engine_death))
    app.state.engine = engine
    app.state.metrics = metrics
    install_error_handlers(app)
    _add_middleware(app, metrics, keys, max_request_body, allowed_origins)
    _add_service_routes(app, engine, metrics)
    _add_model_routes(app, engine)
    _add_generation_routes(app, engine, metrics, default_max_tokens)
    _add_prefix_routes(app, engine)
    _add_token_routes(app, engine)
    app.openapi = _openapi_without_422(app)

    @app.get("/", include_in_schema=False)
    async def root():
        return JSONResponse({"name": "statex-serve", "version": __version__, "model": engine.model_name,
                             "docs": "/docs"})

    return app


def _lifespan(engine: Engine, on_engine_death: Callable[[], None] | None):
    """Start the engine with the app (in uvicorn's event loop), watch it, shut it down with the app."""
    async def watch_engine():
        """The engine died (not shut down): say so once and let the process go."""
        while engine.is_alive:
            await asyncio.sleep(0.25)
        logger.critical("the engine has died; in-flight requests were failed; stopping the server")
        if on_engine_death is not None:
            on_engine_death()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        watcher = asyncio.create_task(watch_engine())
        try:
            yield
        finally:
            watcher.cancel()
            await engine.shutdown()

    return lifespan


def _add_middleware(app: FastAPI, metrics: Metrics, keys: list[str], max_request_body: int,
                    allowed_origins: Sequence[str] | None) -> None:
    """The last added is the outermost: counting, then CORS, then the key and body gate."""
    app.add_middleware(_Gate, keys={k.encode(): key_namespace(k) for k in keys}, max_body=max_request_body)
    if allowed_origins:
        # outside the key check: a browser's preflight (OPTIONS) carries no key
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in allowed_origins)
    app.add_middleware(_CountRequests, metrics=metrics)   # added last: the outermost, so it counts 401 and 413 too


def _add_service_routes(app: FastAPI, engine: Engine, metrics: Metrics) -> None:
    """/health, /metrics, /version."""
    @app.get("/health", responses=_errors(503))
    async def health():
        if not engine.is_alive:
            raise APIError(503, "the engine is not running", code="engine_dead")
        reason = engine.unhealthy_reason()
        if reason is not None:
            raise APIError(503, reason, code="engine_stalled")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def version():
        return {"version": __version__}


def _add_model_routes(app: FastAPI, engine: Engine) -> None:
    """/v1/models: one card per served model name."""
    created = int(time.time())

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "statex-serve",
                "root": engine.model_path, "parent": None, "max_model_len": engine.max_model_len,
                "permission": [], "statex": engine.describe()}

    @app.get("/v1/models", responses=_errors(401))
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in engine.served_model_names]}

    @app.get("/v1/models/{model:path}", responses=_errors(401, 404))
    async def get_model(model: str):
        check_model(engine, model)
        return model_card(model)


def _add_generation_routes(app: FastAPI, engine: Engine, metrics: Metrics, default_max_tokens: int | None) -> None:
    """/v1/completions and /v1/chat/completions (one pipeline: ``generation.py``)."""
    completions = CompletionsEndpoint(engine, metrics, default_max_tokens)
    chat = ChatEndpoint(engine, metrics, default_max_tokens)

    @app.post("/v1/completions", responses={**_STREAM, **_errors(400, 401, 404, 413, 500, 503)})
    async def create_completion(body: CompletionRequest, request: Request):
        return await completions.create(body, request)

    @app.post("/v1/chat/completions", responses={**_STREAM, **_errors(400, 401, 404, 413, 500, 503)})
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await chat.create(body, request)


def _add_prefix_routes(app: FastAPI, engine: Engine) -> None:
    """/v1/prefixes: pinned prefixes of the prefix cache."""
    prefixes = PrefixesEndpoint(engine)

    @app.post("/v1/prefixes", responses=_errors(400, 401, 404, 413, 500, 503))
    async def create_prefix(body: PrefixCreateRequest, request: Request):
        return await prefixes.create(body, request)

    @app.get("/v1/prefixes", responses=_errors(401))
    async def list_prefixes(request: Request):
        return prefixes.list(request)

    @app.get("/v1/prefixes/{prefix_id}", responses=_errors(401, 404))
    async def get_prefix(prefix_id: str, request: Request):
        return prefixes.get(prefix_id, request)

    @app.delete("/v1/prefixes/{prefix_id}", responses=_errors(401, 404))
    async def delete_prefix(prefix_id: str, request: Request):
        return prefixes.delete(prefix_id, request)


def _add_token_routes(app: FastAPI, engine: Engine) -> None:
    """vLLM's /tokenize and /detokenize (vLLM's benchmark client uses them)."""
    token_chars = max_token_chars(engine.tokenizer)

    @app.post("/tokenize", responses=_errors(400, 401, 404, 413))
    async def tokenize(body: TokenizeRequest):
        check_model(engine, body.model)
        tok = engine.tokenizer
        if body.messages is not None:
            check_prompt_chars(engine, token_chars, message_chars(body.messages), "messages")
            ids = await asyncio.to_thread(render_chat, tok, body.messages, body.add_generation_prompt)
        elif body.prompt is not None:
            check_prompt_chars(engine, token_chars, len(body.prompt), "prompt")
            ids = await asyncio.to_thread(tok.encode, body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise APIError(400, "give either prompt or messages", "prompt", "invalid_value")
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @app.post("/detokenize", responses=_errors(400, 401, 404, 413))
    async def detokenize(body: DetokenizeRequest):
        check_model(engine, body.model)
        bad = next((t for t in body.tokens if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {engine.vocab_size})", "tokens",
                           "invalid_token_id")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

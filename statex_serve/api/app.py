"""The FastAPI app over any ``Engine``: OpenAI-compatible routes, /health,
/metrics, vLLM's /tokenize and /detokenize (vLLM's benchmark client uses them),
and /v1/prefixes (pinned prefixes of the prefix cache).

``create_app(engine, api_key=None)``; the app starts the engine in its lifespan
(in uvicorn's event loop) and shuts it down with it.
"""
from __future__ import annotations

import contextlib
import hmac
import time

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from statex_serve import __version__
from statex_serve.api.chat import ChatEndpoint, render_chat
from statex_serve.api.completions import CompletionsEndpoint
from statex_serve.api.errors import APIError, install_error_handlers
from statex_serve.api.generation import check_model
from statex_serve.api.metrics import Metrics
from statex_serve.api.prefixes import PrefixesEndpoint
from statex_serve.api.schemas import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, PrefixCreateRequest, TokenizeRequest,
)
from statex_serve.engine.base import Engine

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


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    metrics = Metrics(engine)
    completions = CompletionsEndpoint(engine, metrics)
    chat = ChatEndpoint(engine, metrics)
    prefixes = PrefixesEndpoint(engine)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="statex-serve", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(_CountRequests, metrics=metrics)

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorized)]

    @app.get("/health")
    async def health():
        if not engine.is_alive:
            raise APIError(503, "the engine is not running", code="engine_dead")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/version")
    async def version():
        return {"version": __version__}

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "statex-serve",
                "root": engine.model_path, "parent": None, "max_model_len": engine.max_model_len,
                "permission": [], "statex": engine.describe()}

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in engine.served_model_names]}

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def get_model(model: str):
        check_model(engine, model)
        return model_card(model)

    @app.post("/v1/completions", dependencies=auth)
    async def create_completion(body: CompletionRequest, request: Request):
        return await completions.create(body, request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await chat.create(body, request)

    @app.post("/v1/prefixes", dependencies=auth)
    async def create_prefix(body: PrefixCreateRequest, request: Request):
        return await prefixes.create(body, request)

    @app.get("/v1/prefixes", dependencies=auth)
    async def list_prefixes():
        return prefixes.list()

    @app.get("/v1/prefixes/{prefix_id}", dependencies=auth)
    async def get_prefix(prefix_id: str):
        return prefixes.get(prefix_id)

    @app.delete("/v1/prefixes/{prefix_id}", dependencies=auth)
    async def delete_prefix(prefix_id: str):
        return prefixes.delete(prefix_id)

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest):
        check_model(engine, body.model)
        tok = engine.tokenizer
        if body.messages is not None:
            ids = render_chat(tok, body.messages, body.add_generation_prompt)
        elif body.prompt is not None:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise APIError(400, "give either prompt or messages", "prompt", "invalid_value")
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest):
        check_model(engine, body.model)
        bad = next((t for t in body.tokens if not 0 <= t < engine.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {engine.vocab_size})", "tokens",
                           "invalid_token_id")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    @app.get("/", include_in_schema=False)
    async def root():
        return JSONResponse({"name": "statex-serve", "version": __version__, "model": engine.model_name,
                             "docs": "/docs"})

    return app

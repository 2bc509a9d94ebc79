"""OpenAI's error JSON, for every way a request can go wrong:
``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status."""
from __future__ import annotations

import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from statex_serve.engine.base import (
    EngineDeadError, EngineOverloadedError, InvalidRequestError, PrefixNotFoundError, RequestFailedError,
)

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """Raise anywhere in a handler; becomes the OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 err_type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.err_type = err_type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return _ErrorResponse(self.body(), status_code=self.status, headers=self.headers)


class _ErrorResponse(JSONResponse):
    """ASCII JSON: an error body renders whatever text it quotes (even a lone
    surrogate a client sent), where Starlette's UTF-8 rendering would raise."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _internal(e: BaseException, what: str = "internal server error") -> APIError:
    """A 500 that tells the client an id to quote and nothing about our internals;
    the details go to the log under that id."""
    error_id = f"err-{uuid.uuid4().hex[:16]}"
    logger.error("%s %s: %r", what, error_id, e, exc_info=e)
    return APIError(500, f"{what} (error id {error_id}; the server log has the details)", code="internal_error")


def from_engine_error(e: Exception) -> APIError:
    """The HTTP face of an engine exception."""
    if isinstance(e, InvalidRequestError):
        return APIError(400, e.message, e.param, e.code or "invalid_value")
    if isinstance(e, EngineOverloadedError):
        return APIError(503, e.message, code="server_overloaded",
                        headers={"Retry-After": str(max(1, round(e.retry_after)))})
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), code="engine_dead")
    if isinstance(e, PrefixNotFoundError):
        return APIError(404, str(e), "prefix_id", "prefix_not_found")
    if isinstance(e, RequestFailedError):
        return APIError(500, str(e), code="internal_error")   # says nothing internal (the engine logged it)
    if isinstance(e, UnicodeError):     # text no tokenizer can take that slipped past the schemas
        return APIError(400, "the request contains text that is not valid Unicode (e.g. a lone UTF-16 "
                             "surrogate)", code="invalid_value")
    return _internal(e)


def _validation_message(err: dict) -> tuple[str, str | None]:
    """A pydantic error as one sentence, and the request field it is about."""
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    # drop pydantic's union-member tags (e.g. "list[int]") from the path
    loc = [x for x in loc if not any(c in x for c in "[]")]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    if not loc and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return "The request body must be a JSON object.", None
    if err.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    msg = msg.removeprefix("Value error, ")
    return (f"Invalid value for '{param}': {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    """Every error (ours, FastAPI's, an unexpected one) answers with OpenAI's error body."""
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
            return APIError(400, "We could not parse the JSON body of your request. (HINT: This likely means "
                                 f"you aren't using your HTTP library correctly.) ({detail})",
                            code="invalid_json").response()
        message, param = _validation_message(errors[0]) if errors else ("invalid request", None)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return APIError(400, message, param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}."
        else:
            message = str(exc.detail)
        return APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return from_engine_error(exc).response()


def sse_error(err: APIError) -> str:
    """An error inside an already-started stream (headers are sent): one event."""
    return f"data: {json.dumps(err.body())}\n\n"

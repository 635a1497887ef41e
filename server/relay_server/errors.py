"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with a matching HTTP status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from relay_llm.scheduler import QueueFull

log = logging.getLogger("relay_server")

# HTTP status -> OpenAI error type
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class APIError(Exception):
    """An error to send to the client as an OpenAI error body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.message = message
        self.code = code
        self.param = param
        self.type = type or error_type(status)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type(status), param, code), status_code=status, headers=headers)


def bad_request(message: str, *, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


def unsupported(message: str, *, param: str | None = None) -> APIError:
    return APIError(400, message, code="unsupported_feature", param=param)


def queue_full(exc: QueueFull) -> APIError:
    """The engine's queue is full: OpenAI's 429, with Retry-After."""
    return APIError(429, str(exc), code="rate_limit_exceeded", headers={"Retry-After": str(exc.retry_after_s)})


def from_engine_error(exc: Exception) -> APIError:
    """Map the engine's ValueError (bad input) to a 400."""
    text = str(exc)
    if "KV budget" in text:
        return APIError(400, text, code="context_length_exceeded", param="max_tokens")
    if "exceeds the model's context" in text:
        return APIError(400, text, code="context_length_exceeded", param="messages")
    if "grammar engine" in text or "response_format" in text or "tool" in text:  # structured output
        param = "response_format" if "response_format" in text else "tools"
        return APIError(400, text, code="invalid_value", param=param)
    if "schedule" in text or "relay" in text or "profile" in text:
        return APIError(400, text, code="invalid_value", param="relay")
    return APIError(400, text, code="invalid_value")


def _loc(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc(tuple(first.get("loc", ())))
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return error_response(400, message, param=param, code="invalid_request")


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, f"internal server error: {type(exc).__name__}", code="internal_error")


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)

"""The one map from errors to the Gemini error envelope `{"error": {code, message, status}}`.

TuneryError subclasses carry their HTTP code and status; request validation, malformed JSON,
unknown routes and anything unexpected are mapped here too, so every failure has the same shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunery.errors import InvalidArgument, TuneryError

log = logging.getLogger(__name__)

# HTTP code → canonical google.rpc.Code name, for errors that do not come as a TuneryError.
_STATUS_BY_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ALREADY_EXISTS",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

# google.rpc.Code numbers, for an Operation's `error.code` (which is gRPC's, not HTTP's).
GRPC_CODES = {
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "UNAUTHENTICATED": 16,
}


class InvalidApiKey(InvalidArgument):
    """An API key was sent but is not one of ours: 400 with reason API_KEY_INVALID, as Google."""

    reason = "API_KEY_INVALID"

    def __init__(self) -> None:
        super().__init__("API key not valid. Please pass a valid API key.")


def internal_error() -> TuneryError:
    """What a caller sees of an unexpected failure: no traceback, no internals."""
    return TuneryError("Internal error encountered.")


def envelope(
    code: int, status: str, message: str, details: list[Any] | None = None
) -> JSONResponse:
    """The Gemini error body as a response with HTTP status `code`."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return JSONResponse(status_code=code, content={"error": error})


def error_body(exc: TuneryError) -> dict[str, Any]:
    """The envelope's inner object for `exc`; also used for errors inside a stream."""
    return {"code": exc.http_code, "message": exc.message, "status": exc.status}


def tunery_error_response(exc: TuneryError) -> JSONResponse:
    details = None
    if isinstance(exc, InvalidApiKey):
        details = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": exc.reason,
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ]
    return envelope(exc.http_code, exc.status, exc.message, details)


def _location(loc: tuple[int | str, ...]) -> str:
    """`("body", "generationConfig", "topK")` → `generationConfig.topK`; list indexes as `[i]`."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_message(errors: list[Any]) -> str:
    """A readable one-line message from pydantic/FastAPI validation errors."""
    parts = []
    for err in errors:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx", {}).get("error", "")
            return f"Invalid JSON payload received. {ctx}".strip()
        if err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",):
            return "Invalid JSON payload received. The request body is empty."
        where = _location(tuple(err.get("loc", ())))
        parts.append(f"`{where}`: {err.get('msg', 'invalid value')}" if where else err["msg"])
    return "Invalid JSON payload received. " + "; ".join(parts)


async def _on_tunery_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TuneryError)
    return tunery_error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return envelope(400, "INVALID_ARGUMENT", validation_message(list(exc.errors())))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = _STATUS_BY_HTTP.get(exc.status_code, "UNKNOWN")
    if exc.status_code == 404:
        message = f"Method not found: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not supported for {request.url.path}"
    else:
        message = str(exc.detail)
    return envelope(exc.status_code, status, message)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return tunery_error_response(internal_error())


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler above on `app`."""
    app.add_exception_handler(TuneryError, _on_tunery_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)

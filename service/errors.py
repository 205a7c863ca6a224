"""Typed service errors and the handlers that render every error as `{"error": {code, message, request_id}}`.

Each failure a client can cause or meet has its own class with a fixed HTTP status and a stable `code`, so the
routes raise meaning ("queue full") and this module alone decides the wire format. Unknown exceptions become a
500 with the request id in the request-context middleware; the traceback goes to the log, never to the client.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class NuwaError(Exception):
    """Base of every error the service answers on purpose.

    Attributes:
        status_code: HTTP status of the answer.
        code: Stable machine-readable reason (clients branch on it; documented in docs/API.md).
        message: Human-readable explanation, including the numbers involved.
        headers: Extra response headers (e.g. Retry-After).
    """

    status_code: int = 500
    code: str = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or {}


class BadRequestError(NuwaError):
    status_code = 400
    code = "bad_request"


class UnauthorizedError(NuwaError):
    status_code = 401
    code = "unauthorized"


class PayloadTooLargeError(NuwaError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaError(NuwaError):
    status_code = 415
    code = "unsupported_media_type"


class ValidationFailedError(NuwaError):
    status_code = 422
    code = "validation_error"


class QueueFullError(NuwaError):
    """Admission refused: the queue is at its request or visual-token bound (answered 429 + Retry-After)."""

    status_code = 429
    code = "queue_full"


class UnavailableError(NuwaError):
    """The worker is loading, restarting, dead or the server is draining (503 + Retry-After)."""

    status_code = 503
    code = "unavailable"


class DeadlineExceededError(NuwaError):
    status_code = 504
    code = "deadline_exceeded"


def error_body(code: str, message: str, request_id: str | None) -> dict[str, Any]:
    """The JSON body of every error answer."""
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def request_id_of(request: Request) -> str | None:
    """The id the request-context middleware gave this request (None outside it)."""
    return getattr(request.state, "request_id", None)


def error_response(
    request: Request, status_code: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """Render one error and remember its code for the access log line."""
    request.state.error_code = code
    return JSONResponse(
        status_code=status_code, content=error_body(code, message, request_id_of(request)), headers=headers
    )


async def _handle_nuwa_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NuwaError)
    return error_response(request, exc.status_code, exc.code, exc.message, exc.headers)


async def _handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {
        400: "bad_request",
        401: "unauthorized",
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
    }
    code = codes.get(exc.status_code, "http_error")
    return error_response(request, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))


async def _handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}")
    return error_response(request, 422, "validation_error", "; ".join(parts) or "invalid request")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers of every EXPECTED error, so each leaves in the one JSON shape.

    Unexpected exceptions are not handled here: they propagate to `service.middleware.RequestContextMiddleware`,
    the outermost layer the app controls, which logs them and answers the JSON 500 with the request id.
    """
    app.add_exception_handler(NuwaError, _handle_nuwa_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)


__all__ = [
    "BadRequestError",
    "DeadlineExceededError",
    "NuwaError",
    "PayloadTooLargeError",
    "QueueFullError",
    "UnauthorizedError",
    "UnavailableError",
    "UnsupportedMediaError",
    "ValidationFailedError",
    "error_body",
    "error_response",
    "install_error_handlers",
    "request_id_of",
]

"""Per-request context as a pure ASGI middleware: request id, body-size limit, duration metric, access log.

Pure ASGI (not `BaseHTTPMiddleware`) so the request body streams through untouched and a client disconnect is
still visible to the route. It is the outermost layer the app controls, so it also turns an unexpected exception
into the JSON 500 (with the request id) instead of uvicorn's plain-text one.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLargeError, error_body
from service.logs import log_request
from service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def valid_request_id(value: str | None) -> str | None:
    """The client's X-Request-Id when it is a sane token (kept out of logs otherwise)."""
    if value is not None and _REQUEST_ID_RE.match(value):
        return value
    return None


class RequestContextMiddleware:
    """Give every HTTP request an id, enforce `max_body_bytes`, time it, and log one JSON line.

    Args:
        app: The wrapped ASGI app.
        metrics: Where `nuwa_request_duration_seconds{endpoint,status}` is recorded.
        max_body_bytes: Largest accepted body; a larger Content-Length is refused before reading, and a chunked
            body is cut off (413) as soon as it passes the limit.
    """

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        headers = Headers(scope=scope)
        request_id = valid_request_id(headers.get("x-request-id")) or uuid.uuid4().hex
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started_at"] = started
        response_started = False
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal response_started, status
            if message["type"] == "http.response.start":
                response_started = True
                status = int(message["status"])
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise PayloadTooLargeError(
                        f"request body exceeds {self.max_body_bytes} bytes (NUWA_MAX_BODY_BYTES)",
                        code="body_too_large",
                    )
            return message

        try:
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                state["error_code"] = "body_too_large"
                message = f"request body is {length} bytes; the limit is {self.max_body_bytes} (NUWA_MAX_BODY_BYTES)"
                response = JSONResponse(
                    status_code=413,
                    content=error_body("body_too_large", message, request_id),
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive_limited, send_with_id)
        except Exception:
            logger.exception("unhandled error in request %s", request_id)
            if not response_started:
                state["error_code"] = "internal_error"
                response = JSONResponse(
                    status_code=500,
                    content=error_body(
                        "internal_error", "internal server error; see the log for this request id", request_id
                    ),
                )
                await response(scope, receive, send_with_id)
        finally:
            duration = time.monotonic() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.request_duration.labels(endpoint=endpoint, status=str(status)).observe(duration)
            fields: dict[str, Any] = {
                "request_id": request_id,
                "http_method": scope.get("method"),
                "endpoint": endpoint,
                "status": status,
                "duration_s": round(duration, 6),
            }
            if state.get("error_code"):
                fields["error_code"] = state["error_code"]
            extra = state.get("log_fields")
            if isinstance(extra, dict):
                fields.update(extra)
            if endpoint not in ("/healthz", "/readyz", "/metrics"):
                log_request(fields)


__all__ = ["RequestContextMiddleware", "valid_request_id"]

"""Per-request context as a pure ASGI middleware: request id, body limits, duration metric, access log.

Pure ASGI (not `BaseHTTPMiddleware`) so the request body streams through untouched and a client disconnect is
still visible to the route. It is the outermost layer the app controls, so it also:

* bounds the body: a Content-Length over `max_body_bytes` is refused before reading (413), a chunked body is cut
  off as soon as it passes the limit, a pause between two body pieces longer than `body_idle_timeout_s` is a 408,
  and so is a body that is not complete by the request's deadline (which starts when the request arrives, so
  the upload counts against it: a client sending less than its Content-Length cannot hold a connection);
* answers a client that left during its upload as 499 (logged at INFO, `status="499"` in the metric), not 500;
* turns an unexpected exception into the JSON 500 (with the request id) instead of uvicorn's plain-text one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import spans
from service.errors import NuwaError, PayloadTooLargeError, error_body
from service.logs import log_request
from service.metrics import ServiceMetrics
from service.settings import Settings

logger = logging.getLogger(__name__)

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_QUIET_ENDPOINTS = frozenset({"/healthz", "/readyz", "/metrics"})
_CLOSE = {"Connection": "close"}  # the rest of a late body cannot be told from the next request: say so
BODY_GRACE_S = 0.5
"""How long past the request's deadline a body may still complete before the answer is 408 (else 504)."""


class RequestTimeoutError(NuwaError):
    """The request body did not arrive in time (idle pause or the request's deadline)."""

    status_code = 408
    code = "request_timeout"


def valid_request_id(value: str | None) -> str | None:
    """The client's X-Request-Id when it is a sane token (kept out of logs otherwise)."""
    if value is not None and _REQUEST_ID_RE.match(value):
        return value
    return None


def _deadline_s(headers: Headers, settings: Settings) -> float:
    """The request's time budget for its body (the route validates X-Request-Timeout itself)."""
    try:
        return min(float(headers.get("x-request-timeout", "inf")), settings.request_timeout_s)
    except ValueError:
        return settings.request_timeout_s


class RequestContextMiddleware:
    """Give every HTTP request an id, bound its body, time it, and log one JSON line.

    Args:
        app: The wrapped ASGI app.
        metrics: Where `nuwa_request_duration_seconds{endpoint,status}` is recorded.
        settings: For `max_body_bytes`, `body_idle_timeout_s` and `request_timeout_s`.
    """

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics, settings: Settings) -> None:
        self.app = app
        self.metrics = metrics
        self.settings = settings

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
        spans.mark(request_id, "arrived")
        response_started = False
        status = 500
        max_body = self.settings.max_body_bytes
        idle_s = self.settings.body_idle_timeout_s
        deadline = started + _deadline_s(headers, self.settings)

        async def send_with_id(message: Message) -> None:
            nonlocal response_started, status
            if message["type"] == "http.response.start":
                response_started = True
                spans.mark(request_id, "responding")
                status = int(message["status"])
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        received = 0
        body_complete = False

        async def receive_guarded() -> Message:
            nonlocal received, body_complete
            if body_complete:  # after the body only disconnects arrive: no timeout (streaming listens here)
                return await receive()
            # The body may finish up to BODY_GRACE_S past the deadline (the route then answers 504 itself);
            # a body still incomplete after that is the client's doing: 408.
            timeout = min(idle_s, deadline + BODY_GRACE_S - time.monotonic())
            if timeout <= 0:
                raise RequestTimeoutError(
                    "the request body did not arrive within the request's deadline", headers=dict(_CLOSE)
                )
            try:
                async with asyncio.timeout(timeout):  # a timer; `wait_for` would make a task per body message
                    message = await receive()
            except TimeoutError:
                raise RequestTimeoutError(
                    f"the request body stalled: nothing arrived for {timeout:.3g} s "
                    "(NUWA_BODY_IDLE_TIMEOUT_S, or the request's deadline)",
                    headers=dict(_CLOSE),
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    raise PayloadTooLargeError(
                        f"request body exceeds {max_body} bytes (NUWA_MAX_BODY_BYTES)", code="body_too_large"
                    )
                body_complete = not message.get("more_body", False)
            return message

        try:
            length = headers.get("content-length")
            if length is not None and length.isdigit() and len(length) < 20 and int(length) > max_body:
                state["error_code"] = "body_too_large"
                message = f"request body is {length} bytes; the limit is {max_body} (NUWA_MAX_BODY_BYTES)"
                response = JSONResponse(
                    status_code=413,
                    content=error_body("body_too_large", message, request_id),
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive_guarded, send_with_id)
        except ClientDisconnect:
            status = 499  # nginx's "client closed request": nothing can be sent, and it is not a server error
            state["error_code"] = "client_disconnected"
            logger.info("client of request %s disconnected before its request was read", request_id)
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
            if endpoint not in _QUIET_ENDPOINTS:
                log_request(fields)


__all__ = ["RequestContextMiddleware", "RequestTimeoutError", "valid_request_id"]

"""uvicorn's HTTP/1.1 (h11) protocol with the limits a public endpoint needs, and JSON even for protocol errors.

What stock uvicorn leaves open (measured: a silent connection stayed open > 95 s; slowloris headers were never
cut off), and what this subclass adds, each from settings:

* a header deadline: a connection must deliver a request's complete headers within `header_timeout_s` of its
  first byte (or of the connection, for the first request); otherwise 408 (or a plain close if it sent nothing);
* a cap on concurrent connections (`max_connections`): the one over the cap is answered 503 and closed at once;
* JSON bodies with a request id for the errors uvicorn answers itself (malformed requests, 400), like every other
  error of the service. Idle keep-alive connections are closed by uvicorn's own `timeout_keep_alive`.

What cannot be changed without replacing uvicorn: a request line or header block larger than h11's limit is a
400 (JSON now, but without the route's context), and errors on a connection upgraded to another protocol.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import error_body
from service.settings import Settings

logger = logging.getLogger(__name__)

_REASONS = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}


def guarded_protocol(settings: Settings) -> type[H11Protocol]:
    """The protocol class uvicorn should use (`uvicorn.Config(http=...)`), bound to these settings."""

    class GuardedH11Protocol(_GuardedH11Protocol):
        header_timeout_s = settings.header_timeout_s
        max_connections = settings.max_connections

    return GuardedH11Protocol


class _GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    max_connections: int = 512

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._bytes_since_request = 0

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            logger.warning(
                "connection refused: %d open, the cap is %d", len(self.connections) - 1, self.max_connections
            )
            self._reply_and_close(
                503,
                "too_many_connections",
                f"the server holds {self.max_connections} connections (NUWA_MAX_CONNECTIONS); retry shortly",
                retry_after=1,
            )
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        waiting_for_headers = cycle is None or cycle.response_complete
        super().data_received(data)
        if self.cycle is not cycle:  # the headers of a new request arrived
            self._cancel_header_timer()
            self._bytes_since_request = 0
        elif waiting_for_headers and not self.transport.is_closing():
            self._bytes_since_request += len(data)
            if self._header_timer is None:  # the first bytes of the next request on a kept-alive connection
                self._arm_header_timer()

    # ------------------------------------------------------------------ limits
    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return  # a request is being served: its body and deadline are the middleware's business
        if self._bytes_since_request == 0 and cycle is None:
            self.transport.close()  # nothing was ever sent: just let the connection go
            return
        self._reply_and_close(
            408,
            "request_timeout",
            f"the request's headers did not arrive within {self.header_timeout_s:g} s (NUWA_HEADER_TIMEOUT_S)",
        )

    # ------------------------------------------------------------------ protocol errors as JSON
    def send_400_response(self, msg: str) -> None:
        self._reply_and_close(400, "bad_request", f"{msg} (the request could not be parsed as HTTP/1.1)")

    def _reply_and_close(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        """Write a complete JSON response straight to the socket and close (no request cycle exists)."""
        request_id = uuid.uuid4().hex
        body = json.dumps(error_body(code, message, request_id)).encode()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("connection", "close"),
            ("x-request-id", request_id),
        ]
        if retry_after is not None:
            headers.append(("retry-after", str(retry_after)))
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers)
            + "\r\n"
        )
        try:
            self.transport.write(head.encode("latin-1") + body)
        finally:
            self.transport.close()


__all__ = ["guarded_protocol"]

"""Raw-socket HTTP for the connection-level hostile tests: what httpx will not do (send nothing, send headers one
line at a time, send less body than Content-Length, hang up mid-upload), and a reader for what comes back."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class RawResponse:
    """One HTTP/1.1 response read off a socket.

    Attributes:
        status: The status code of the status line.
        headers: Header names in lower case.
        body: The body (up to Content-Length, or to the close).
        closed: The server closed the connection after it.
        elapsed_s: Seconds from `read_response`'s call to the end of the response.
    """

    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool
    elapsed_s: float

    def error(self) -> dict[str, Any]:
        """The documented error JSON `{"error": {code, message, request_id}}`, checked against X-Request-Id."""
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        payload = json.loads(self.body)
        assert set(payload) == {"error"}, payload
        error = payload["error"]
        assert set(error) == {"code", "message", "request_id"}, error
        assert error["message"], error
        assert error["request_id"] and error["request_id"] == self.headers.get("x-request-id"), (
            error,
            self.headers,
        )
        return error


def connect(base_url: str, timeout_s: float = 30.0) -> socket.socket:
    """A TCP connection to the server of `base_url` (loopback)."""
    parts = urlsplit(base_url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket, timeout_s: float = 30.0) -> RawResponse | None:
    """Read one response, or None when the server closed the connection without sending one.

    Raises:
        TimeoutError: Nothing complete arrived within `timeout_s`.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    data = b""
    closed = False
    head_end = -1
    length: int | None = None
    while True:
        if head_end < 0:
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                length = _content_length(data[:head_end])
        if head_end >= 0 and length is not None and len(data) >= head_end + 4 + length:
            break
        if closed:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete response within {timeout_s} s (got {data[:200]!r})")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            closed = True
        data += chunk
    elapsed = time.monotonic() - started
    if head_end < 0:
        if data:
            raise AssertionError(f"not an HTTP response: {data[:200]!r}")
        return None
    lines = data[:head_end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = data[head_end + 4 :]
    if length is not None:
        body = body[:length]
    if not closed and headers.get("connection", "").lower() == "close":
        closed = closed_by_peer(sock, 5.0)
    return RawResponse(status, headers, body, closed, elapsed)


def closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the server closes the connection within `timeout_s` (reading and dropping anything it sends)."""
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


@contextmanager
def trickling(sock: socket.socket, pieces: Iterable[bytes], every_s: float) -> Iterator[None]:
    """Send `pieces` one every `every_s` from a thread while the block runs (a slow client); stops at the block's
    end or at the first send that fails (the server hung up)."""
    stop = threading.Event()

    def send() -> None:
        for piece in pieces:
            if stop.wait(every_s):
                return
            try:
                sock.sendall(piece)
            except OSError:
                return

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join(5)


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    """A request line and header block (Host and Connection included by the caller when wanted)."""
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


__all__ = ["RawResponse", "closed_by_peer", "connect", "read_response", "request_head", "trickling"]

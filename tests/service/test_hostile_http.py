"""Slow and hostile clients at the connection level (issue 15, defects 4-6 and the HTTP items of point 10).

Each case talks raw sockets to the real `python -m service` (the `hostile_server` of conftest: header and body
timeouts of 2 s, keep-alive 2 s, at most 24 connections, URL fetches of at most 3 s from an allow-listed local
origin) and asserts the status, the JSON error body with its request id, and when the server let go. The time
bounds are lower bounds from the settings plus a generous margin for a loaded machine: what is checked is that
a connection is cut at its timeout instead of held for minutes (the old server held them > 75 s).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.service.conftest import HOSTILE_SETTINGS, ServerProcess
from tests.service.helpers import assert_error, metric, red_circle_png, scrape
from tests.service.raw_http import closed_by_peer, connect, read_response, request_head, trickling

HEADER_TIMEOUT_S = float(HOSTILE_SETTINGS["header_timeout_s"])
BODY_IDLE_S = float(HOSTILE_SETTINGS["body_idle_timeout_s"])
KEEP_ALIVE_S = float(HOSTILE_SETTINGS["keep_alive_s"])
MAX_CONNECTIONS = int(HOSTILE_SETTINGS["max_connections"])
URL_FETCH_TIMEOUT_S = float(HOSTILE_SETTINGS["url_fetch_timeout_s"])
SLACK_S = 4.0
"""Margin on top of a timeout for a loaded 2-core machine (the defect was a hold of > 75 s, not of 3 s)."""
BODY_GRACE_S = 0.5  # service.middleware.BODY_GRACE_S: a body may finish this long past the deadline


@pytest.fixture
def hostile(hostile_server: ServerProcess) -> Iterator[httpx.Client]:
    with hostile_server.client(api_key=None) as http:
        yield http


def _upload_head(length: int, **extra: str) -> bytes:
    headers = {
        "Host": "127.0.0.1",
        "Content-Type": "multipart/form-data; boundary=b0undary",
        "Content-Length": str(length),
        **extra,
    }
    return request_head("POST", "/ground", headers)


# --------------------------------------------------------------------------------------------- header phase


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(
    hostile_server: ServerProcess,
) -> None:
    with connect(hostile_server.base_url) as sock:
        started = time.monotonic()
        response = read_response(sock, timeout_s=HEADER_TIMEOUT_S + SLACK_S)
        held = time.monotonic() - started
    assert response is None  # closed without a word: it never started a request
    assert HEADER_TIMEOUT_S - 0.2 <= held <= HEADER_TIMEOUT_S + SLACK_S


def test_slowloris_headers_are_cut_off_with_a_json_408(hostile_server: ServerProcess) -> None:
    with connect(hostile_server.base_url) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /ground HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        header_lines = (f"X-Slow-{index}: {'a' * 10}\r\n".encode() for index in range(200))
        with trickling(sock, header_lines, every_s=0.3):  # never the blank line that ends the headers
            response = read_response(sock, timeout_s=HEADER_TIMEOUT_S + SLACK_S)
        held = time.monotonic() - started
    assert response is not None and response.status == 408
    assert response.error()["code"] == "request_timeout"
    assert "NUWA_HEADER_TIMEOUT_S" in response.error()["message"]
    assert response.closed
    assert HEADER_TIMEOUT_S - 0.2 <= held <= HEADER_TIMEOUT_S + SLACK_S


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nthis is not a header\r\n\r\n",
        b"NOT-HTTP AT ALL\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: twelve\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
    ],
    ids=["bad_header_line", "bad_request_line", "bad_content_length", "header_block_over_h11_limit"],
)
def test_malformed_http_gets_a_json_400_with_a_request_id(hostile_server: ServerProcess, raw: bytes) -> None:
    with connect(hostile_server.base_url) as sock:
        try:
            sock.sendall(raw)
        except OSError:  # the server may answer and close before taking all of an oversized header block
            pass
        response = read_response(sock, timeout_s=10)
    assert response is not None and response.status == 400
    assert response.error()["code"] == "bad_request"
    assert response.closed


def test_an_idle_keep_alive_connection_is_closed_after_keep_alive_s(hostile_server: ServerProcess) -> None:
    with connect(hostile_server.base_url) as sock:
        sock.sendall(request_head("GET", "/healthz", {"Host": "127.0.0.1"}))
        response = read_response(sock, timeout_s=10)
        assert response is not None and response.status == 200 and not response.closed
        idle_from = time.monotonic()
        assert closed_by_peer(sock, KEEP_ALIVE_S + 2.0)
        idle = time.monotonic() - idle_from
    # The server's timer starts when it sends the response, before `idle_from`: a client descheduled for a moment
    # sees a shorter idle time, hence the wide lower bound (still far from an immediate close).
    assert KEEP_ALIVE_S - 1.0 <= idle <= KEEP_ALIVE_S + 2.0  # uvicorn's own default is 5 s


def test_connections_over_the_cap_get_a_json_503(
    hostile_server: ServerProcess, hostile: httpx.Client
) -> None:
    hostile.close()  # this test counts connections: hold none but its own
    time.sleep(0.5)  # and let the server see the earlier tests' connections close
    held: list[socket.socket] = []
    try:
        first_held_at = time.monotonic()
        for _ in range(MAX_CONNECTIONS):
            held.append(connect(hostile_server.base_url))
        time.sleep(0.3)  # let the server register all of them
        with connect(hostile_server.base_url) as extra:
            started = time.monotonic()
            response = read_response(extra, timeout_s=5)
        assert response is not None and response.status == 503
        error = response.error()
        assert error["code"] == "too_many_connections"
        assert str(MAX_CONNECTIONS) in error["message"] and "NUWA_MAX_CONNECTIONS" in error["message"]
        assert response.headers.get("retry-after") == "1"
        assert response.closed and response.elapsed_s < 2.0 and time.monotonic() - started < 3.0
        # The ones under the cap were accepted and left waiting for their headers (checked while their header
        # timeout cannot have run out yet: on a slow machine it may have, and then closing them is right).
        if time.monotonic() - first_held_at < HEADER_TIMEOUT_S - 0.2:
            for sock in held:
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    sock.recv(1)
    finally:
        for sock in held:
            sock.close()
    with hostile_server.client(api_key=None) as fresh:  # the slots come back when the connections close
        deadline = time.monotonic() + 5
        while (status := fresh.get("/healthz").status_code) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == 200


# --------------------------------------------------------------------------------------------- body phase


def test_a_body_shorter_than_its_content_length_is_a_408_at_the_idle_timeout(
    hostile_server: ServerProcess,
) -> None:
    with connect(hostile_server.base_url) as sock:
        sock.sendall(
            _upload_head(100_000, **{"X-Request-Id": "short-body-1"}) + b"--b0undary\r\n" + b"x" * 1000
        )
        started = time.monotonic()
        response = read_response(sock, timeout_s=BODY_IDLE_S + SLACK_S)
        released = response is not None and (response.closed or closed_by_peer(sock, SLACK_S))
    assert response is not None and response.status == 408
    error = response.error()
    assert error["code"] == "request_timeout" and error["request_id"] == "short-body-1"
    assert "NUWA_BODY_IDLE_TIMEOUT_S" in error["message"]
    assert released and response.headers["connection"] == "close"  # released, not kept alive
    assert BODY_IDLE_S - 0.2 <= response.elapsed_s <= BODY_IDLE_S + SLACK_S
    assert time.monotonic() - started <= BODY_IDLE_S + SLACK_S


def test_a_trickled_body_is_cut_at_the_request_deadline(hostile_server: ServerProcess) -> None:
    """One byte every 0.3 s never trips the idle timeout, but the deadline (X-Request-Timeout: 1) covers the
    upload: the answer is 408 at about the deadline, never after it."""
    deadline_s = 1.0
    with connect(hostile_server.base_url) as sock:
        started = time.monotonic()
        sock.sendall(_upload_head(100_000, **{"X-Request-Timeout": str(deadline_s)}) + b"--b0undary\r\n")
        with trickling(sock, (b"x" for _ in range(1000)), every_s=0.3):
            response = read_response(sock, timeout_s=deadline_s + SLACK_S)
            held = time.monotonic() - started
            released = response is not None and (response.closed or closed_by_peer(sock, SLACK_S))
    assert response is not None and response.status == 408
    error = response.error()
    assert error["code"] == "request_timeout" and "deadline" in error["message"]
    assert released and response.headers["connection"] == "close"
    assert deadline_s <= held <= deadline_s + BODY_GRACE_S + SLACK_S


def test_a_client_that_leaves_during_its_upload_is_a_499_at_info(
    hostile_server: ServerProcess, hostile: httpx.Client
) -> None:
    before = metric(scrape(hostile), "nuwa_request_duration_seconds_count", endpoint="/ground", status="499")
    errors_before = metric(
        scrape(hostile), "nuwa_request_duration_seconds_count", endpoint="/ground", status="500"
    )
    request_id = f"leaves-mid-upload-{time.monotonic_ns()}"
    with connect(hostile_server.base_url) as sock:
        sock.sendall(
            _upload_head(200_000, **{"X-Request-Id": request_id}) + b"--b0undary\r\n" + b"y" * 10_000
        )
        time.sleep(0.2)  # the route is reading the body
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        samples = scrape(hostile)
        if metric(samples, "nuwa_request_duration_seconds_count", endpoint="/ground", status="499") > before:
            break
        time.sleep(0.1)
    assert (
        metric(samples, "nuwa_request_duration_seconds_count", endpoint="/ground", status="499") == before + 1
    )
    assert (
        metric(samples, "nuwa_request_duration_seconds_count", endpoint="/ground", status="500")
        == errors_before
    )
    records = [record for record in hostile_server.log_records() if request_id in json.dumps(record)]
    access = [record for record in records if record.get("event") == "request"]
    assert len(access) == 1 and access[0]["status"] == 499, records
    assert access[0]["error_code"] == "client_disconnected"
    assert {record["level"] for record in records} == {"INFO"}, records  # no ERROR, no WARNING
    assert not any("exception" in record or "Traceback" in record["message"] for record in records)


# --------------------------------------------------------------------------------------------- URL fetches


@pytest.fixture(scope="module")
def trickling_origin() -> Iterator[str]:
    """An allow-listed origin (127.0.0.1) that sends its headers at once, then one body byte every 2 s."""

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "60")
            self.end_headers()
            try:
                for byte in b"\x89PNG\r\n\x1a\n" + b"\0" * 52:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(2.0)
            except OSError:
                return  # the service gave up and hung up: what it must do

        def log_message(self, *args: object) -> None:
            pass

    origin = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    origin.daemon_threads = True
    thread = threading.Thread(target=origin.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{origin.server_address[1]}/slow.png"
    finally:
        origin.shutdown()
        origin.server_close()


@pytest.mark.parametrize(
    ("header", "bound_s"),
    [(None, URL_FETCH_TIMEOUT_S), ("1.5", 1.5)],
    ids=["NUWA_URL_FETCH_TIMEOUT_S", "X-Request-Timeout"],
)
def test_a_trickling_url_is_cut_at_the_total_fetch_timeout(
    hostile: httpx.Client, trickling_origin: str, header: str | None, bound_s: float
) -> None:
    headers = {"X-Request-Timeout": header} if header else {}
    started = time.monotonic()
    response = hostile.post(
        "/ground", json={"image": trickling_origin, "phrase": "the red circle"}, headers=headers, timeout=30
    )
    held = time.monotonic() - started
    error = assert_error(response, 504, "url_fetch_timeout")
    assert "in total" in error["message"]
    assert bound_s - 0.2 <= held <= bound_s + SLACK_S  # the old per-read timeout held it ~2 s per byte


# --------------------------------------------------------------------------------------------- pages and probes


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_head_on_the_probes_is_200(hostile: httpx.Client, path: str) -> None:
    response = hostile.head(path)
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_assets_from_the_service(hostile: httpx.Client, page: str) -> None:
    html = hostile.get(page)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    external = re.findall(r"""(?:src|href)=["']?(https?:)?//[^"'\s>]+""", html.text)
    assert not external, f"{page} loads from outside the service: {external}"
    assets = re.findall(r"""(?:src|href)=["']?(/[^"'\s>]+)""", html.text)
    assert any(asset.endswith(".js") for asset in assets), html.text
    for asset in assets:
        fetched = hostile.get(asset)
        assert fetched.status_code == 200, asset
        assert len(fetched.content) > 1000 or asset == "/openapi.json", asset
    assert hostile.get("/openapi.json").json()["info"]["title"] == "nuwa-serve"
    assert_error(hostile.get("/docs-assets/../settings.py"), 404)


def test_docs_and_openapi_are_labelled_by_route_in_metrics(hostile: httpx.Client) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert hostile.get(path).status_code == 200
    samples = scrape(hostile)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert metric(samples, "nuwa_request_duration_seconds_count", endpoint=path, status="200") >= 1, path
    assert not any(
        labels == (("endpoint", "unmatched"), ("status", "200"))
        for (name, labels) in samples
        if name == "nuwa_request_duration_seconds_count"
    )


def test_the_server_still_answers_after_the_hostile_clients(hostile: httpx.Client) -> None:
    response = hostile.post(
        "/ground",
        files={"image": ("a.png", red_circle_png(), "image/png")},
        data={"phrase": "the red circle"},
    )
    assert response.status_code == 200, response.text
    assert hostile.get("/healthz").json()["status"] == "ok"

"""Cheap inputs that used to exhaust the API process (issue 15, defects 1, 2 and 8): bounded memory, a free loop.

Against the real `python -m service` (the `hostile_server` of conftest, NUWA_MAX_IMAGE_PIXELS=40000000 and the
default 20 MB body limit), while a thread polls GET /healthz:

* 16 concurrent 40-megapixel PNGs of 132 KB each (compressible, one colour): all answered 200, the API
  process's peak RSS (VmHWM of `python -m service`, not the worker) under `API_RSS_BOUND_MB`. The old API decoded
  each one for its size check, again for the model, and pickled the pixels to the worker: 3.6 GB for 8 of them.
* 4 concurrent 250 KB PNGs of 8944x8944 (80 MP): 413 from the header, nothing decoded. The old probe called
  `getexif()`, which decodes a PNG in full, on the event loop.
* an 18 MB JSON body of 1.3 million keys: a fast 400 (the old server parsed it on the loop for seconds).

The probe latency bound. The issue asks for /healthz within 100 ms throughout. On this project's shared 2-core
machine (load average 3-10 from other jobs) no server reaches that as a WORST case: a bare asyncio server
polled alongside peaked at 0.18-0.68 s at load 6-10, and the service's worst /healthz during the 16-PNG burst
was 0.16-0.55 s at load 3-4 and up to 1.4 s at load 10 (the worker decoding 40 MP images takes the same 2 cores),
while its median stayed at 5-30 ms. The old server stalled /healthz for 7 s and more (its event loop decoded).
So every probe is polled together with a bare asyncio server in its own process (`control_server`), and checked:
all 200; median under 100 ms; worst under `PROBE_TIMEOUT_S` (1 s, Kubernetes' default probe timeout, past which
readiness flaps) PLUS the worst the bare server saw at the same time, i.e. the service adds less than 1 s to the
machine's own stalls. The numbers are printed (pytest -s) and in every failure message, with the load average.
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.service.conftest import HOSTILE_SETTINGS, ServerProcess
from tests.service.helpers import assert_error

API_RSS_BOUND_MB = 600
"""Documented bound (docs/API.md) on the API process's peak RSS under 16 concurrent 40 MP uploads (measured: 90)."""
PROBE_TIMEOUT_S = 1.0
PROBE_MEDIAN_S = 0.1
MAX_PIXELS = int(HOSTILE_SETTINGS["max_image_pixels"])


def _png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (236, 232, 226)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def png_40mp() -> bytes:
    data = _png(6324)
    assert 6324 * 6324 <= MAX_PIXELS and len(data) < 200_000
    return data


def _status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def _reset_peak_rss(pid: int) -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0, own processes), so it measures one test alone."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


CONTROL_SERVER = """
import asyncio


async def answer(reader, writer):
    try:
        while await reader.readuntil(b"\\r\\n\\r\\n"):
            writer.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main():
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


asyncio.run(main())
"""


@pytest.fixture(scope="module")
def control_server() -> Iterator[str]:
    """A bare asyncio HTTP server in its own process: what the machine alone does to a probe's latency."""
    process = subprocess.Popen([sys.executable, "-c", CONTROL_SERVER], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class ProbeLatencies:
    """GET /healthz latencies (seconds) and statuses, and the bare control server's latencies next to them."""

    samples: list[tuple[float, int]] = field(default_factory=list)
    control: list[float] = field(default_factory=list)

    @property
    def worst(self) -> float:
        return max(latency for latency, _ in self.samples)

    @property
    def median(self) -> float:
        return statistics.median(latency for latency, _ in self.samples)

    def summary(self) -> str:
        over = sum(1 for latency, _ in self.samples if latency > 0.1)
        load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
        return (
            f"/healthz: {len(self.samples)} probes, worst {self.worst * 1000:.0f} ms, median "
            f"{self.median * 1000:.0f} ms, {over} over 100 ms; a bare asyncio server at the same time: worst "
            f"{max(self.control) * 1000:.0f} ms; machine load average {load}"
        )

    def check(self) -> None:
        print(self.summary())
        assert self.samples and self.control, "no probe was answered"
        assert {status for _, status in self.samples} == {200}, self.summary()
        assert self.median < PROBE_MEDIAN_S, self.summary()
        assert self.worst < PROBE_TIMEOUT_S + max(self.control), self.summary()


@contextmanager
def polling_healthz(server: ServerProcess, control_url: str) -> Iterator[ProbeLatencies]:
    """Poll /healthz and the control server in turn, every 50 ms, from one thread, while the block runs."""
    latencies = ProbeLatencies()
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.base_url, timeout=30) as probe, httpx.Client(timeout=30) as bare:
            while not stop.is_set():
                started = time.monotonic()
                status = probe.get("/healthz").status_code
                latencies.samples.append((time.monotonic() - started, status))
                started = time.monotonic()
                bare.get(control_url)
                latencies.control.append(time.monotonic() - started)
                stop.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(0.3)
    try:
        yield latencies
    finally:
        time.sleep(0.3)
        stop.set()
        poller.join(35)


def _in_parallel(count: int, send: Callable[[httpx.Client], httpx.Response], server: ServerProcess) -> list:
    results: list[httpx.Response | BaseException] = [RuntimeError("not sent")] * count

    def one(index: int) -> None:
        with server.client(api_key=None, timeout=300) as http:
            try:
                results[index] = send(http)
            except BaseException as exc:  # reported by the assertion below
                results[index] = exc

    threads = [threading.Thread(target=one, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return results


def test_16_concurrent_40_megapixel_pngs_keep_the_api_small_and_probes_fast(
    hostile_server: ServerProcess, png_40mp: bytes, control_server: str
) -> None:
    pid = hostile_server.process.pid  # `python -m service` itself: the API process, not its worker
    reset = _reset_peak_rss(pid)
    peak_polled = 0
    stop = threading.Event()

    def watch_rss() -> None:
        nonlocal peak_polled
        while not stop.wait(0.01):
            peak_polled = max(peak_polled, _status(pid)["VmRSS"])

    watcher = threading.Thread(target=watch_rss, daemon=True)
    watcher.start()

    def send(http: httpx.Client) -> httpx.Response:
        return http.post(
            "/ground", files={"image": ("big.png", png_40mp, "image/png")}, data={"phrase": "the red circle"}
        )

    try:
        with polling_healthz(hostile_server, control_server) as latencies:
            started = time.monotonic()
            responses = _in_parallel(16, send, hostile_server)
            elapsed = time.monotonic() - started
    finally:
        stop.set()
        watcher.join(5)
    for response in responses:
        assert isinstance(response, httpx.Response), response
        assert response.status_code == 200, response.text
        assert response.json()["image_size"] == [6324, 6324]
    peak_mb = (_status(pid)["VmHWM"] if reset else peak_polled) / 1024
    print(f"16 x 40 MP PNG: {elapsed:.1f} s; API peak RSS {peak_mb:.0f} MB (polled {peak_polled / 1024:.0f})")
    assert peak_mb < API_RSS_BOUND_MB
    assert peak_polled / 1024 < API_RSS_BOUND_MB
    latencies.check()


def test_4_concurrent_80_megapixel_pngs_are_413_from_the_header_without_a_stall(
    hostile_server: ServerProcess, control_server: str
) -> None:
    data = _png(8944)
    assert len(data) < 300_000

    def send(http: httpx.Client) -> httpx.Response:
        return http.post(
            "/ground", files={"image": ("big.png", data, "image/png")}, data={"phrase": "the red circle"}
        )

    with polling_healthz(hostile_server, control_server) as latencies:
        started = time.monotonic()
        responses = _in_parallel(4, send, hostile_server)
        elapsed = time.monotonic() - started
    for response in responses:
        assert isinstance(response, httpx.Response), response
        error = assert_error(response, 413, "image_too_large")
        assert f"{8944 * 8944}" in error["message"] and f"{MAX_PIXELS}" in error["message"]
    print(f"4 x 80 MP PNG refused in {elapsed * 1000:.0f} ms")
    assert elapsed < 5.0  # a full decode is ~1 s per image here, on the loop it was 0.5-3 s of stall each
    latencies.check()


def test_an_18_megabyte_json_body_of_a_million_keys_is_a_fast_400(
    hostile_server: ServerProcess, control_server: str
) -> None:
    body = ("{" + ",".join(f'"key{index:07d}":0' for index in range(1_300_000)) + "}").encode()
    assert 17_000_000 < len(body) < 20 * 1024 * 1024  # under NUWA_MAX_BODY_BYTES: the parser must cope
    with (
        polling_healthz(hostile_server, control_server) as latencies,
        hostile_server.client(api_key=None) as http,
    ):
        timings = []
        for path in ("/ground", "/v1/chat/completions"):
            started = time.monotonic()
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
            timings.append(time.monotonic() - started)
            error = assert_error(response, 400, "invalid_json")
            assert "limit" in error["message"]
    print(f"18 MB JSON body refused in {', '.join(f'{t * 1000:.0f} ms' for t in timings)}")
    assert max(timings) < 5.0
    latencies.check()


def test_the_big_inputs_left_nothing_held(hostile_server: ServerProcess) -> None:
    """The old API kept 2.3 GB after 8 big PNGs were answered; now the queue is empty and so is the memory."""
    with hostile_server.client(api_key=None) as http:
        load = http.get("/readyz").json()["load"]
        gauges = http.get("/metrics").text
    assert load["queued_requests"] == 0 and load["queued_visual_tokens"] == 0, load
    assert load["requests_in_worker"] == 0, load
    assert "nuwa_queue_image_bytes 0.0" in gauges
    rss_mb = _status(hostile_server.process.pid)["VmRSS"] / 1024
    print(f"API RSS after the big inputs: {rss_mb:.0f} MB")
    assert rss_mb < API_RSS_BOUND_MB

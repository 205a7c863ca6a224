"""A second server with a small queue: 429 when the visual-token queue is full, clients that leave are dropped
from the queue, and SIGTERM drains (readiness 503, new work 503, queued work finishes, clean exit)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import ServerProcess, serving
from tests.service.helpers import assert_error, ground, metric, red_circle_png, scrape

STALL = "stalls-the-worker"
"""A phrase containing this holds its batch in the worker for 3 s (test-only `NUWA_FAULT_INJECTION`)."""

# One request at a time, and a queue of at most 2000 estimated visual tokens (13 images of 144 tokens).
SMALL_QUEUE = {
    "max_batch_size": "1",
    "max_wait_ms": "0",
    "max_queue_requests": "100",
    "max_queue_visual_tokens": "2000",
    "retry_after_s": "2",
    "drain_timeout_s": "30",
    "fault_injection": f"sleep:3:{STALL}",
}


def _wait_for_load(client: httpx.Client, what: str, condition, timeout_s: float = 20.0) -> dict[str, float]:
    """Poll /readyz until its `load` satisfies `condition` (the test's steps wait on the server, not on sleeps)."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = client.get("/readyz").json()["load"]
        if condition(load):
            return load
        assert time.monotonic() < deadline, f"never reached: {what}; last load {load}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def small_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(model_dir, tmp_path_factory.mktemp("logs"), "small-queue", **SMALL_QUEUE) as handle:
        yield handle


def test_full_visual_token_queue_answers_429_with_retry_after(small_server: ServerProcess) -> None:
    png = red_circle_png()
    depths: list[float] = []
    with small_server.client() as client, ThreadPoolExecutor(max_workers=40) as pool:
        futures = [pool.submit(ground, client, png, "the red circle", budget=16) for _ in range(40)]
        for _ in range(5):
            time.sleep(0.1)
            samples = scrape(client)
            depths.append(metric(samples, "nuwa_queue_depth_visual_tokens"))
        responses = [future.result(timeout=120) for future in futures]
        samples = scrape(client)
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses and 429 in statuses, statuses
    for response in responses:
        if response.status_code == 429:
            assert_error(response, 429, "queue_full_visual_tokens")
            assert response.headers["retry-after"] == "2"
    assert max(depths) > 0 and max(depths) <= 2000 and max(depths) % 144 == 0, depths
    assert metric(samples, "nuwa_rejections_total", reason="queue_full_visual_tokens") == statuses.count(429)
    assert metric(samples, "nuwa_queue_depth_requests") == 0


def test_client_that_leaves_is_dropped_from_the_queue(small_server: ServerProcess) -> None:
    png = red_circle_png()
    # The first request holds the worker for 3 s and the second fills the pipeline's second slot, so what
    # comes next stays in the API's queue: two more requests, then this one, which leaves after 1 s.
    with small_server.client() as client, ThreadPoolExecutor(max_workers=12) as pool:
        before = metric(scrape(client), "nuwa_rejections_total", reason="client_disconnected")
        busy = [pool.submit(ground, client, png, f"the red circle {STALL}")]
        _wait_for_load(client, "the stalled batch in the worker", lambda load: load["batches_in_worker"] == 1)
        busy += [pool.submit(ground, client, png, "the red circle", budget=16) for _ in range(3)]
        _wait_for_load(
            client,
            "a second batch in the worker and two requests queued",
            lambda load: load["batches_in_worker"] == 2 and load["queued_requests"] == 2,
        )
        with small_server.client(timeout=1.0) as impatient, pytest.raises(httpx.ReadTimeout):
            ground(impatient, png, "the red circle", headers={"X-Request-Id": "impatient-1"})
        assert all(future.result(timeout=60).status_code == 200 for future in busy)
        deadline = time.monotonic() + 10
        while metric(scrape(client), "nuwa_rejections_total", reason="client_disconnected") == before:
            assert time.monotonic() < deadline, "the server never noticed the client leaving"
            time.sleep(0.1)
    lines = [
        r
        for r in small_server.log_records()
        if r.get("request_id") == "impatient-1" and r.get("event") == "request"
    ]
    assert len(lines) == 1
    assert lines[0]["status"] == 499 and lines[0]["client_gone_while"] == "queued"


def test_sigterm_drains_queued_work_then_exits(small_server: ServerProcess) -> None:
    png = red_circle_png()
    with small_server.client() as client, ThreadPoolExecutor(max_workers=10) as pool:
        futures = [pool.submit(ground, client, png, f"the red circle {STALL}")]
        futures += [pool.submit(ground, client, png, "the red circle", budget=16 + i) for i in range(9)]
        # All ten admitted (one stalled in the worker, one in the pipeline's second slot, eight queued) before
        # the signal: one that arrived after it would rightly get 503 shutting_down.
        _wait_for_load(
            client,
            "all ten requests admitted",
            lambda load: load["queued_requests"] + load["requests_in_worker"] == 10,
        )
        small_server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5  # the drain starts a loop turn or two after the signal
        while (ready := client.get("/readyz")).status_code == 200:
            assert time.monotonic() < deadline, "readiness never went to 503 after SIGTERM"
            time.sleep(0.01)
        assert_error(ready, 503, "draining")
        refused = ground(client, png, "the red circle")
        assert_error(refused, 503, "shutting_down")
        assert refused.headers["retry-after"] == "2"
        statuses = [future.result(timeout=60).status_code for future in futures]
    assert statuses == [200] * 10
    assert small_server.process.wait(timeout=60) == 0
    messages = [r.get("message", "") for r in small_server.log_records()]
    assert any("draining" in message for message in messages)
    assert any("worker exiting" in message for message in messages)

"""Kill the worker process during a run of requests: every request gets an answer, the worker comes back."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.service.conftest import ServerProcess
from tests.service.helpers import assert_error, ground, metric, red_circle_png, scrape


def test_killed_worker_fails_fast_and_restarts(server: ServerProcess, client: httpx.Client) -> None:
    health = client.get("/healthz").json()
    old_pid = health["worker"]["pid"]
    restarts_before = metric(scrape(client), "nuwa_worker_restarts_total")
    png = red_circle_png()

    def send(index: int) -> httpx.Response:
        time.sleep(0.02 * index)  # a stream of requests, not one burst
        return ground(client, png, "the red circle", budget=16 + index)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=24) as pool:
        futures = [pool.submit(send, index) for index in range(24)]
        time.sleep(0.25)
        os.kill(old_pid, signal.SIGKILL)
        responses = [future.result(timeout=60) for future in futures]
    elapsed = time.monotonic() - started

    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, statuses  # some requests were in flight or queued when it died
    for response in responses:
        if response.status_code == 503:
            assert_error(response, 503)["message"]
            assert response.json()["error"]["code"] in ("worker_died", "worker_not_ready")
            assert response.headers["retry-after"]
    assert elapsed < 30, "requests hung after the worker died"

    server.wait_for("/readyz", timeout_s=120)
    health = client.get("/healthz").json()
    assert health["status"] == "ok"
    assert health["worker"]["pid"] != old_pid
    assert health["worker"]["restarts"] >= 1
    assert metric(scrape(client), "nuwa_worker_restarts_total") == restarts_before + 1
    after = ground(client, png, "the red circle", budget=32)
    assert after.status_code == 200, after.text

"""A server whose model cannot load: never ready, 503 everywhere work is asked for, restarts with backoff."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.service.conftest import ServerProcess, start_server
from tests.service.helpers import assert_error, ground, metric, red_circle_png, scrape


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    missing = tmp_path_factory.mktemp("empty") / "no-such-model"
    handle = start_server(missing, tmp_path_factory.mktemp("logs"), "broken", retry_after_s="3")
    try:
        handle.wait_for("/metrics")
        yield handle
    finally:
        handle.stop()


def test_worker_that_cannot_load_keeps_the_service_unready(broken_server: ServerProcess) -> None:
    with broken_server.client() as client:
        assert_error(client.get("/readyz"), 503, "not_ready")
        refused = ground(client, red_circle_png(), "the red circle")
        assert_error(refused, 503, "worker_not_ready")
        assert refused.headers["retry-after"] == "3"
        health = broken_server.wait_for("/healthz", status=503, timeout_s=120)
        error = health.json()["error"]
        assert error["code"] == "worker_down" and "no-such-model" in error["message"]
        assert client.get("/v1/models").json()["data"][0]["id"] == "no-such-model"
        samples = scrape(client)
        assert metric(samples, "nuwa_worker_ready") == 0
        assert metric(samples, "nuwa_rejections_total", reason="worker_not_ready") >= 1

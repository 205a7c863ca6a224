"""A worker that hangs, a worker that is busy, a model that cannot start, a prompt that cannot fit.

Each uses the real service; stalls come from the test-only `NUWA_FAULT_INJECTION` hook (the worker sleeps, or
blocks forever, on a request whose text contains a marker).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import API_KEY, ServerProcess, serving, start_server
from tests.service.helpers import assert_error, ground, metric, red_circle_png, scrape


@pytest.fixture(scope="module")
def hanging_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(
        model_dir,
        tmp_path_factory.mktemp("logs"),
        "hanging",
        api_keys=API_KEY,
        fault_injection="hang:HANGME",
        batch_timeout_s="3",
        request_timeout_s="30",
    ) as handle:
        yield handle


def test_a_hung_batch_fails_with_worker_stuck_and_the_worker_is_replaced(
    hanging_server: ServerProcess,
) -> None:
    with hanging_server.client() as client:
        old_pid = client.get("/healthz").json()["worker"]["pid"]
        before = scrape(client)
        started = time.monotonic()
        response = ground(client, red_circle_png(), "HANGME the red circle")
        waited = time.monotonic() - started
        error = assert_error(response, 503, "worker_stuck")
        assert "NUWA_BATCH_TIMEOUT_S" in error["message"] and response.headers["retry-after"]
        assert 2.5 <= waited < 20, waited  # the watchdog's 3 s, not the 30 s deadline
        hanging_server.wait_for("/readyz", timeout_s=120)
        health = client.get("/healthz").json()
        assert "worker" in health, health
        assert health["worker"]["pid"] != old_pid and health["worker"]["restarts"] >= 1
        after = scrape(client)
        assert (
            metric(after, "nuwa_rejections_total", reason="worker_stuck")
            - metric(before, "nuwa_rejections_total", reason="worker_stuck")
            == 1
        )
        assert ground(client, red_circle_png(), "the red circle").status_code == 200


@pytest.fixture(scope="module")
def busy_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(
        model_dir,
        tmp_path_factory.mktemp("logs"),
        "busy",
        api_keys=API_KEY,
        fault_injection="sleep:6:BUSY",
        liveness_timeout_s="2",
        batch_timeout_s="30",
        max_phrase_chars="5000",
    ) as handle:
        yield handle


def test_a_busy_worker_stays_live_while_readiness_reports_the_load(busy_server: ServerProcess) -> None:
    """The batch runs 6 s, three times the liveness timeout: /healthz must stay 200 all along."""
    results: dict[str, httpx.Response] = {}

    def send() -> None:
        with busy_server.client() as client:
            results["busy"] = ground(client, red_circle_png(), "BUSY the red circle")

    thread = threading.Thread(target=send)
    thread.start()
    health_codes, busy_seen, load_seen = [], [], []
    with httpx.Client(base_url=busy_server.base_url, timeout=10) as probe:
        deadline = time.monotonic() + 30.0  # probe the whole batch, however late it reaches the worker
        while thread.is_alive() and time.monotonic() < deadline:
            health = probe.get("/healthz")
            health_codes.append(health.status_code)
            busy_seen.append(health.json().get("worker", {}).get("busy_s"))
            ready = probe.get("/readyz")
            if ready.status_code == 200:
                load_seen.append(ready.json()["load"]["batches_in_worker"])
            time.sleep(0.25)
    thread.join(60)
    assert set(health_codes) == {200}, health_codes
    assert max((b for b in busy_seen if b is not None), default=0) >= 2.0, busy_seen  # busy past the timeout
    assert max(load_seen, default=0) >= 1, load_seen
    assert results["busy"].status_code == 200, results["busy"].text


def test_a_prompt_longer_than_the_positions_is_refused_before_the_worker(busy_server: ServerProcess) -> None:
    phrase = " ".join(["the leftmost red circle next to the blue square"] * 60)  # ~3000 characters
    with busy_server.client() as client:
        error = assert_error(ground(client, red_circle_png(), phrase), 422, "prompt_too_long")
        assert "512 positions" in error["message"]
        assert ground(client, red_circle_png(), "the red circle").status_code == 200


def test_a_model_that_cannot_start_stops_retrying_and_exits_3(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "not_a_vlm"}))
    handle = start_server(
        broken,
        tmp_path / "logs",
        "cannot-start",
        worker_start_attempts="2",
        worker_failure_exit_s="3",
    )
    try:
        failed = handle.wait_for("/healthz", status=503, timeout_s=120)
        deadline = time.monotonic() + 60
        while failed.json()["error"]["code"] != "worker_failed" and time.monotonic() < deadline:
            time.sleep(0.2)
            failed = httpx.get(f"{handle.base_url}/healthz")
        error = failed.json()["error"]
        assert error["code"] == "worker_failed"
        assert "not_a_vlm" in error["message"] and "fix:" in error["message"]
        ready = httpx.get(f"{handle.base_url}/readyz").json()["error"]
        assert ready["code"] == "worker_failed" and "not_a_vlm" in ready["message"]
        code = handle.process.wait(timeout=60)
    finally:
        handle.stop()
    assert code == 3
    records = [json.loads(line) for line in handle.log_path.read_text().splitlines() if line.startswith("{")]
    give_up = [r for r in records if "giving up" in r["message"]]
    assert len(give_up) == 1 and give_up[0]["level"] == "CRITICAL"
    assert "LLaVA-1.5, Qwen2.5-VL or Qwen3-VL" in give_up[0]["message"]
    starts = [
        r for r in records if r["logger"] == "service.supervisor" and r["message"].startswith("worker ")
    ]
    starts = [r for r in starts if "failed to start:" in r["message"]]
    assert len(starts) == 2  # exactly the configured attempts, then no more restarts

"""/metrics exposes the nuwa_* metrics, recorded in the API process, and they move with traffic."""

from __future__ import annotations

import time

import httpx

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import ServerProcess
from tests.service.helpers import assert_error, ground, metric, red_circle_png, scrape

REQUIRED = [
    "nuwa_request_duration_seconds",
    "nuwa_queue_time_seconds",
    "nuwa_time_to_first_token_seconds",
    "nuwa_stage_seconds",
    "nuwa_visual_tokens_original",
    "nuwa_visual_tokens_kept",
    "nuwa_keep_ratio",
    "nuwa_batch_size",
    "nuwa_queue_depth_requests",
    "nuwa_queue_depth_visual_tokens",
    "nuwa_queue_capacity_requests",
    "nuwa_queue_capacity_visual_tokens",
    "nuwa_rejections_total",
    "nuwa_worker_restarts_total",
    "nuwa_generated_tokens_total",
    "nuwa_worker_ready",
]


def test_metrics_are_exposed_and_move_with_traffic(client: httpx.Client) -> None:
    text = client.get("/metrics").text
    for name in REQUIRED:
        assert f"# TYPE {name}" in text or f"# TYPE {name.removesuffix('_total')}" in text, name
    before = scrape(client)
    response = ground(client, red_circle_png(), "the red circle", budget=36, method="nuwa")
    assert response.status_code == 200
    generated = response.json()
    assert_error(ground(client, red_circle_png(), "a", headers={"X-Request-Timeout": "0.0005"}), 504)
    after = scrape(client)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("nuwa_request_duration_seconds_count", endpoint="/ground", status="200") == 1
    assert delta("nuwa_request_duration_seconds_count", endpoint="/ground", status="504") == 1
    assert delta("nuwa_queue_time_seconds_count") == 1
    assert delta("nuwa_time_to_first_token_seconds_count") == 1
    for stage in ("preprocess", "vision", "prune", "prefill", "decode"):
        assert delta("nuwa_stage_seconds_count", stage=stage) == 1
    assert delta("nuwa_stage_seconds_sum", stage="vision") > 0
    assert delta("nuwa_visual_tokens_original_sum") == 144
    report = generated["visual_tokens"]
    assert delta("nuwa_visual_tokens_kept_sum", stage="stage1") == report["stage1"]
    assert delta("nuwa_visual_tokens_kept_sum", stage="average") == report["average"]
    assert abs(delta("nuwa_keep_ratio_sum") - report["average"] / 144) < 1e-9
    assert delta("nuwa_batch_size_count") >= 1
    assert delta("nuwa_generated_tokens_total") >= 1
    assert delta("nuwa_rejections_total", reason="deadline") == 1
    assert metric(after, "nuwa_worker_ready") == 1
    assert metric(after, "nuwa_queue_depth_requests") == 0
    assert metric(after, "nuwa_queue_depth_visual_tokens") == 0


def test_queue_capacity_is_the_configured_limit(client: httpx.Client, server: ServerProcess) -> None:
    """The backlog alerts divide the queue depth by these gauges, so they must carry the server's own limits."""
    env = {key[len("NUWA_") :].lower(): val for key, val in server.env.items() if key.startswith("NUWA_")}
    configured = Settings.model_validate(env)
    samples = scrape(client)
    assert metric(samples, "nuwa_queue_capacity_requests") == configured.max_queue_requests
    assert metric(samples, "nuwa_queue_capacity_visual_tokens") == configured.max_queue_visual_tokens


def test_queue_capacity_follows_non_default_limits() -> None:
    metrics = create_app(Settings(max_queue_requests=16, max_queue_visual_tokens=8192)).state.metrics
    assert metrics.registry.get_sample_value("nuwa_queue_capacity_requests") == 16
    assert metrics.registry.get_sample_value("nuwa_queue_capacity_visual_tokens") == 8192


def test_one_json_log_line_per_request(client: httpx.Client, server: ServerProcess) -> None:
    response = ground(
        client, red_circle_png(), "the red circle", budget=64, headers={"X-Request-Id": "log-check-1"}
    )
    assert response.status_code == 200
    deadline = time.monotonic() + 10  # the line is written as the response leaves: give it a moment
    while True:
        lines = [
            r
            for r in server.log_records()
            if r.get("event") == "request" and r.get("request_id") == "log-check-1"
        ]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lines) == 1
    line = lines[0]
    assert line["endpoint"] == "/ground" and line["status"] == 200
    assert line["visual_tokens_original"] == 144 and line["budget"] == 64
    for key in ("duration_s", "queue_s", "ttft_s", "vision_s", "prefill_s", "decode_s", "batch_size"):
        assert isinstance(line[key], int | float), key

"""Load-adaptive degradation: under a long queue new requests get fewer visual tokens (never below their floor)
instead of being refused, and the response says what was applied. Policy rules first, then a real server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from models.budget import PruningConfig
from service.admission import DegradationPolicy
from service.settings import Settings
from tests.service.conftest import ServerProcess, serving
from tests.service.helpers import assert_error, ground, red_circle_png

# ---------------------------------------------------------------------------------------------- policy rules


def test_level_is_zero_below_start_and_rises_linearly_to_one_at_full() -> None:
    policy = DegradationPolicy(start=4, full=7, floor=0.25)
    assert [policy.level(depth) for depth in range(10)] == [0, 0, 0, 0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    step = DegradationPolicy(start=3, full=3, floor=0.25)
    assert [step.level(depth) for depth in (2, 3, 9)] == [0.0, 1.0, 1.0]
    off = DegradationPolicy(start=0, full=0, floor=0.25)
    assert not off.enabled and off.level(1000) == 0.0


def test_ratio_budget_moves_towards_the_floor_and_reports_it() -> None:
    policy = DegradationPolicy(start=2, full=5, floor=0.25)
    config = PruningConfig(method="nuwa", budget=0.75)
    same, none = policy.apply(config, visual_tokens=144, queue_depth=1)
    assert same is config and none is None
    half, applied = policy.apply(config, visual_tokens=144, queue_depth=3)  # level 0.5
    assert applied is not None
    assert half.budget == pytest.approx(0.5) and half.method == "nuwa"
    assert applied.requested_budget == 0.75 and applied.applied_budget == half.budget
    assert applied.floor_budget == 0.25 and applied.queue_depth == 3 and applied.level == 0.5
    floor, applied = policy.apply(config, visual_tokens=144, queue_depth=9)
    assert floor.budget == 0.25 and applied is not None and applied.level == 1.0


def test_keep_all_request_is_degraded_from_ratio_one() -> None:
    policy = DegradationPolicy(start=1, full=1, floor=0.5)
    degraded, applied = policy.apply(PruningConfig(method="nuwa", budget=None), 144, queue_depth=1)
    assert degraded.budget == 0.5 and applied is not None and applied.requested_budget is None


def test_token_budget_stays_in_tokens_and_respects_the_request_floor() -> None:
    policy = DegradationPolicy(start=1, full=3, floor=0.1)
    config = PruningConfig(method="pooling", budget=100)
    degraded, applied = policy.apply(config, 144, queue_depth=2, min_budget=40)  # level 2/3
    assert isinstance(degraded.budget, int)
    assert degraded.budget == round(100 / 144 * 144 - (2 / 3) * (100 - 40))  # 60 tokens
    assert applied is not None and applied.floor_budget == 40
    floor, _ = policy.apply(config, 144, queue_depth=50, min_budget=40)
    assert floor.budget == 40


def test_never_raises_a_budget_and_never_touches_method_none() -> None:
    policy = DegradationPolicy(start=1, full=1, floor=0.5)
    low = PruningConfig(method="nuwa", budget=0.25)
    assert policy.apply(low, 144, queue_depth=10) == (low, None)
    assert policy.apply(PruningConfig(method="nuwa", budget=64), 144, 10, min_budget=64)[1] is None
    unpruned = PruningConfig(method="none")
    assert policy.apply(unpruned, 144, queue_depth=10) == (unpruned, None)


def test_settings_validate_the_degradation_window() -> None:
    settings = Settings(degrade_queue_start=4, max_queue_requests=32)
    assert settings.degrade_queue_full_depth == 32
    with pytest.raises(ValueError):
        Settings(degrade_queue_start=10, degrade_queue_full=5)
    with pytest.raises(ValueError):
        Settings(degrade_floor=0.0)
    assert Settings().degrade_queue_start == 0  # off unless configured


# ---------------------------------------------------------------------------------------------- real server

DEGRADING = {
    "api_keys": "test-key",
    "max_batch_size": "1",
    "max_wait_ms": "0",
    "max_queue_requests": "40",
    "degrade_queue_start": "2",
    "degrade_queue_full": "6",
    "degrade_floor": "0.25",
}


@pytest.fixture(scope="module")
def degrading_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(model_dir, tmp_path_factory.mktemp("logs"), "degrading", **DEGRADING) as handle:
        yield handle


def _expected_level(depth: int) -> float:
    return 0.0 if depth < 2 else min(1.0, (depth - 2 + 1) / (6 - 2 + 1))


def test_long_queue_lowers_budgets_down_to_the_floor_and_says_so(degrading_server: ServerProcess) -> None:
    png = red_circle_png()
    # 16 at once on a one-request-at-a-time worker: the queue gets long; every 4th asks for a higher floor
    # and every 8th for method "none", which must never be degraded.
    kinds = [("none", None) if i % 8 == 7 else ("nuwa", "0.6" if i % 4 == 1 else None) for i in range(16)]
    with degrading_server.client() as client, ThreadPoolExecutor(max_workers=16) as pool:
        futures = []
        for method, floor in kinds:
            fields: dict[str, str] = {"budget": "0.75", "method": method}
            if floor is not None:
                fields["min_budget"] = floor
            futures.append(pool.submit(ground, client, png, "the red circle", **fields))
        responses = [future.result(timeout=120) for future in futures]
    assert [r.status_code for r in responses] == [200] * 16, [
        r.text for r in responses if r.status_code != 200
    ]
    degraded = 0
    for (method, floor), response in zip(kinds, responses, strict=True):
        body = response.json()
        applied = body["degradation"]
        tokens = body["visual_tokens"]
        if applied is None:
            # method "none" ignores the budget, so it reports none (it kept every token)
            assert tokens["budget"] == (None if method == "none" else 0.75)
            continue
        degraded += 1
        assert method == "nuwa"
        assert applied["requested_budget"] == 0.75
        assert applied["floor_budget"] == (float(floor) if floor else 0.25)
        assert applied["floor_budget"] <= applied["applied_budget"] < 0.75
        assert tokens["budget"] == applied["applied_budget"]  # what ran is what is reported
        assert applied["level"] == pytest.approx(_expected_level(applied["queue_depth"]), abs=1e-4)
        assert applied["queue_depth"] >= 2
        assert tokens["average"] <= 0.75 * 144 + 1
    assert degraded >= 3, [r.json()["degradation"] for r in responses]
    deadline = time.monotonic() + 10  # access lines are written as the responses leave; give them a moment
    while True:
        log = [r for r in degrading_server.log_records() if "degradation_level" in r]
        if len(log) >= degraded or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(log) == degraded
    assert all(r["degraded_from_budget"] == 0.75 for r in log)


def test_quiet_server_does_not_degrade(degrading_server: ServerProcess) -> None:
    with degrading_server.client() as client:
        body = ground(client, red_circle_png(), "the red circle", budget="0.75").json()
    assert body["degradation"] is None and body["visual_tokens"]["budget"] == 0.75


def test_chat_reports_degradation_field_and_bad_floors_are_422(degrading_server: ServerProcess) -> None:
    import base64

    url = "data:image/png;base64," + base64.b64encode(red_circle_png()).decode()
    chat = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What color is the circle?"},
                ],
            }
        ],
        "nuwa": {"budget": 0.5, "min_budget": 0.25},
    }
    with degrading_server.client() as client:
        response = client.post("/v1/chat/completions", json=chat)
        assert response.status_code == 200, response.text
        assert "degradation" in response.json()["nuwa"]
        assert response.json()["nuwa"]["degradation"] is None
        png = red_circle_png()
        for bad in ("abc", "0", "1.5", "-3"):
            assert_error(ground(client, png, "the red circle", min_budget=bad), 422, "invalid_min_budget")
        bad_chat = {**chat, "nuwa": {"min_budget": "lots"}}
        assert_error(client.post("/v1/chat/completions", json=bad_chat), 422, "invalid_min_budget")


def test_degradation_is_off_by_default_on_the_main_server(client: httpx.Client) -> None:
    body = ground(client, red_circle_png(), "the red circle", budget="0.5").json()
    assert body["degradation"] is None

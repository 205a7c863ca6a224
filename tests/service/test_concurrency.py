"""Dynamic batching over HTTP: concurrent requests share batches, and batching never changes an answer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.service.helpers import ground, scene_png

# Fields that must not depend on which batch a request ran in (timings and batch_size do).
ANSWER_FIELDS = ("boxes", "raw_output", "visual_tokens", "image_size", "model_input_size", "phrase")


def _answer_fields(body: dict[str, Any]) -> dict[str, Any]:
    return {key: body[key] for key in ANSWER_FIELDS}


def _requests() -> list[tuple[bytes, str, dict[str, Any]]]:
    """16 different requests: different scenes and phrases, three methods, token and ratio budgets."""
    methods = [
        ("nuwa", 32),
        ("random", 0.25),
        ("nuwa", 0.5),
        ("pooling", 36),
        ("none", None),
        ("nuwa_stage1", 48),
    ]
    requests = []
    for index in range(16):
        png, phrase, _ = scene_png(seed=100 + index)
        method, budget = methods[index % len(methods)]
        fields: dict[str, Any] = {"method": method}
        if budget is not None:
            fields["budget"] = budget
        requests.append((png, phrase, fields))
    return requests


def test_concurrent_requests_are_batched_and_equal_to_alone(client: httpx.Client) -> None:
    requests = _requests()
    with ThreadPoolExecutor(max_workers=16) as pool:
        concurrent = list(pool.map(lambda r: ground(client, r[0], r[1], **r[2]), requests))
    assert all(response.status_code == 200 for response in concurrent), [r.text for r in concurrent]
    bodies = [response.json() for response in concurrent]
    sizes = [body["batch_size"] for body in bodies]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 8  # NUWA_MAX_BATCH_SIZE=8

    for (png, phrase, fields), batched in zip(requests, bodies, strict=True):
        alone = ground(client, png, phrase, **fields)
        assert alone.status_code == 200, alone.text
        assert alone.json()["batch_size"] == 1
        assert _answer_fields(alone.json()) == _answer_fields(batched), (fields, phrase)


def test_budget_changes_visual_tokens_as_requested(client: httpx.Client) -> None:
    png, phrase, _ = scene_png(seed=7)
    tokens = {}
    for budget in ("16", "64", "0.25", "0.75"):
        response = ground(client, png, phrase, budget=budget, method="nuwa")
        assert response.status_code == 200, response.text
        tokens[budget] = response.json()["visual_tokens"]
    for budget, target in (("16", 16), ("64", 64), ("0.25", 36), ("0.75", 108)):
        report = tokens[budget]
        assert report["original"] == 144
        assert abs(report["average"] - target) <= max(2.0, 0.05 * target), (budget, report)
        assert report["budget"] == (int(budget) if budget.isdigit() else float(budget))
        assert report["stage2"] <= report["stage1"] <= 144
    assert tokens["16"]["stage1"] < tokens["64"]["stage1"]
    full = ground(client, png, phrase, method="none", budget="16").json()["visual_tokens"]
    assert full["stage1"] == full["stage2"] == full["average"] == 144  # "none" ignores the budget


def test_two_methods_in_one_batch_are_both_honoured(client: httpx.Client) -> None:
    png, phrase, _ = scene_png(seed=11)
    variants = [{"method": "random", "budget": 20}, {"method": "nuwa", "budget": 40}] * 4
    for _attempt in range(3):  # batching depends on arrival timing; a few tries make a shared batch certain
        with ThreadPoolExecutor(max_workers=8) as pool:
            responses = list(pool.map(lambda f: ground(client, png, phrase, **f), variants))
        bodies = [r.json() for r in responses]
        assert all(r.status_code == 200 for r in responses)
        for fields, body in zip(variants, bodies, strict=True):
            report = body["visual_tokens"]
            assert report["method"] == fields["method"] and report["budget"] == fields["budget"]
            if fields["method"] == "random":
                assert report["stage1"] == report["stage2"] == 20
            else:
                assert report["stage2"] < report["stage1"] and abs(report["average"] - 40) <= 2
        if any(body["batch_size"] > 1 for body in bodies):
            return
    raise AssertionError("no batch larger than 1 in three bursts of 8 concurrent requests")

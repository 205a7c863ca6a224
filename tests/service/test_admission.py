"""Admission: the queue is bounded in requests and in estimated visual tokens, and tickets release once."""

from __future__ import annotations

import pytest

from service.admission import Admission
from service.errors import QueueFullError


def test_request_bound_refuses_with_retry_after() -> None:
    admission = Admission(max_requests=2, max_visual_tokens=10_000, retry_after_s=3)
    admission.try_admit(10)
    admission.try_admit(10)
    with pytest.raises(QueueFullError) as info:
        admission.try_admit(10)
    assert info.value.status_code == 429
    assert info.value.code == "queue_full_requests"
    assert info.value.headers == {"Retry-After": "3"}
    assert admission.requests == 2


def test_visual_token_bound_counts_tokens_not_requests() -> None:
    admission = Admission(max_requests=100, max_visual_tokens=300)
    admission.try_admit(144)
    admission.try_admit(144)
    with pytest.raises(QueueFullError) as info:
        admission.try_admit(144)
    assert info.value.code == "queue_full_visual_tokens"
    assert "288" in info.value.message and "300" in info.value.message
    admission.try_admit(12)  # a small image still fits
    assert admission.visual_tokens == 300


def test_oversized_request_runs_alone_when_queue_is_empty() -> None:
    admission = Admission(max_requests=10, max_visual_tokens=100)
    big = admission.try_admit(5000)
    with pytest.raises(QueueFullError):
        admission.try_admit(1)
    admission.release(big)
    assert (admission.requests, admission.visual_tokens) == (0, 0)


def test_release_is_idempotent_and_reports_depths() -> None:
    seen: list[tuple[int, int]] = []
    admission = Admission(max_requests=5, max_visual_tokens=1000, on_change=lambda r, t: seen.append((r, t)))
    ticket = admission.try_admit(64)
    admission.release(ticket)
    admission.release(ticket)
    assert seen == [(1, 64), (0, 0)]
    assert admission.requests == 0


def test_bounds_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match="max_requests=0"):
        Admission(max_requests=0, max_visual_tokens=10)

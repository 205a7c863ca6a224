"""BatchTiming: the scheduler's estimate of how long a batch of a given size runs, and of the preparation lead."""

from __future__ import annotations

import pytest

from service.scheduler import BatchTiming


def test_no_estimate_before_any_batch_ran() -> None:
    timing = BatchTiming()
    assert timing.run_s(1) is None
    assert timing.lead_s == 0.0


def test_the_first_observation_is_the_estimate_and_later_ones_move_it_by_alpha() -> None:
    timing = BatchTiming(alpha=0.5)
    timing.observe(size=2, run_s=1.0, lead_s=0.2)
    assert timing.run_s(2) == pytest.approx(1.0)
    assert timing.lead_s == pytest.approx(0.2)
    timing.observe(size=2, run_s=2.0, lead_s=0.4)
    assert timing.run_s(2) == pytest.approx(1.5)
    assert timing.lead_s == pytest.approx(0.3)


def test_an_unseen_size_scales_the_nearest_seen_one() -> None:
    timing = BatchTiming()
    timing.observe(size=2, run_s=1.0, lead_s=0.1)
    timing.observe(size=8, run_s=2.0, lead_s=0.1)
    assert timing.run_s(3) == pytest.approx(1.5)  # nearest is 2: 1.0 * 3 / 2
    assert timing.run_s(6) == pytest.approx(1.5)  # nearest is 8: 2.0 * 6 / 8


def test_meaningless_observations_are_ignored() -> None:
    timing = BatchTiming()
    timing.observe(size=0, run_s=1.0, lead_s=0.1)
    timing.observe(size=1, run_s=0.0, lead_s=0.1)
    assert timing.run_s(1) is None

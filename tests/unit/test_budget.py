"""Tests for models/budget.py: published Nüwa configurations, invariants of every plan, config validation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from models.budget import (
    PruningConfig,
    TokenPlan,
    keep_ratio_of,
    plan_tokens,
    target_tokens,
)
from models.methods import method_names
from models.methods.pooling import pooling_grid


@pytest.mark.parametrize(
    ("budget", "stage1", "stage2", "top_n"),
    [(64, 112, 16, 1), (128, 224, 32, 2), (192, 336, 48, 3)],
)
def test_llava_published_configurations(budget: int, stage1: int, stage2: int, top_n: int) -> None:
    plan = plan_tokens(PruningConfig(budget=budget), 576, 32, (24, 24), family="llava")
    assert (plan.stage1_tokens, plan.stage2_tokens, plan.top_n) == (stage1, stage2, top_n)
    assert plan.stage2_layer == 16
    assert plan.per_layer == (stage1,) * 16 + (stage2,) * 16
    assert plan.average == budget


@pytest.mark.parametrize("num_tokens", [1024, 2916, 64, 144])
@pytest.mark.parametrize(
    ("ratio", "fraction", "stage2_ratio", "top_n"),
    [(0.25, 0.35, 0.42, 3), (0.50, 0.60, 0.66, 3), (0.75, 0.85, 0.70, 4)],
)
def test_qwen_published_configurations(
    num_tokens: int, ratio: float, fraction: float, stage2_ratio: float, top_n: int
) -> None:
    side = math.isqrt(num_tokens)
    expected_stage1 = round(fraction * num_tokens)
    expected_stage2 = round(stage2_ratio * expected_stage1)
    for budget in (ratio, round(ratio * num_tokens)):  # a ratio, or the same budget as a token count
        plan = plan_tokens(PruningConfig(budget=budget), num_tokens, 28, (side, side), family="qwen2_5_vl")
        assert plan.stage1_tokens == expected_stage1
        assert plan.stage2_tokens == expected_stage2
        assert plan.top_n == top_n
        assert plan.stage2_layer == 14
        assert len(plan.per_layer) == 28


def test_qwen_published_values_for_1024_tokens() -> None:
    # Written out by hand so a wrong formula cannot agree with itself.
    plans = [
        plan_tokens(PruningConfig(budget=r), 1024, 28, (32, 32), family="qwen2_5_vl")
        for r in (0.25, 0.5, 0.75)
    ]
    assert [(p.stage1_tokens, p.stage2_tokens) for p in plans] == [(358, 150), (614, 405), (870, 609)]


def test_qwen_other_budgets_interpolate_and_meet_the_average() -> None:
    config = PruningConfig(budget=0.375)  # halfway between 25% and 50% -> stage-2 ratio (0.42 + 0.66) / 2
    plan = plan_tokens(config, 1024, 28, (32, 32), family="qwen2_5_vl")
    assert plan.stage2_tokens == round(0.54 * plan.stage1_tokens)
    assert plan.average == pytest.approx(0.375 * 1024, rel=0.01)
    assert plan.top_n == 3  # family minimum


def test_llava_other_budgets_use_one_seventh_and_meet_the_average() -> None:
    plan = plan_tokens(PruningConfig(budget=100), 576, 32, (24, 24), family="llava")
    assert plan.stage2_tokens == round(plan.stage1_tokens / 7)
    assert plan.average == pytest.approx(100, abs=1)
    assert plan.top_n == math.ceil(plan.stage1_tokens / 144)


def test_overrides_win_over_derived_values() -> None:
    config = PruningConfig(budget=64, top_n=4, stage2_layer=8, stage2_ratio=0.5)
    plan = plan_tokens(config, 576, 32, (24, 24), family="llava")
    assert plan.top_n == 4
    assert plan.stage2_layer == 8
    assert plan.stage2_tokens == round(0.5 * plan.stage1_tokens)
    assert plan.stage1_tokens == round(64 * 32 / (8 + 24 * 0.5))

    fixed = plan_tokens(PruningConfig(budget=64, stage1_fraction=0.15), 576, 32, (24, 24), family="llava")
    assert fixed.stage1_tokens == 86
    assert fixed.stage2_tokens == 42  # K2 solves the average: (64 * 32 - 16 * 86) / 16
    assert fixed.average == 64

    # A fixed K1 above the budget cannot be balanced: K2 clamps to 1 and the plan says so.
    over = plan_tokens(PruningConfig(budget=64, stage1_fraction=0.25), 576, 32, (24, 24), family="llava")
    assert (over.stage1_tokens, over.stage2_tokens) == (144, 1)
    assert over.average == (16 * 144 + 16) / 32


def test_per_layer_length_and_average() -> None:
    plan = plan_tokens(PruningConfig(method="fastv", budget=64), 576, 32, (24, 24))
    assert len(plan.per_layer) == 32
    assert plan.average == sum(plan.per_layer) / 32
    assert plan.stage2_layer == 2
    assert plan.per_layer[:2] == (576, 576)
    assert plan.stage2_tokens == round((64 * 32 - 2 * 576) / 30)


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("grid", [(24, 24), (7, 5), (1, 3), (16, 26)])
@pytest.mark.parametrize("num_layers", [2, 4, 8, 32])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "generic"])
def test_every_plan_is_consistent(
    method: str, ratio: float, grid: tuple[int, int], num_layers: int, family: str
) -> None:
    num_tokens = grid[0] * grid[1]
    plan = plan_tokens(
        PruningConfig(method=method, budget=ratio), num_tokens, num_layers, grid, family=family
    )
    _check_plan(plan, num_tokens, num_layers)


def _check_plan(plan: TokenPlan, num_tokens: int, num_layers: int) -> None:
    assert 1 <= plan.stage2_tokens <= plan.stage1_tokens <= num_tokens
    assert len(plan.per_layer) == num_layers
    assert plan.average == pytest.approx(sum(plan.per_layer) / num_layers)
    assert all(count in (plan.stage1_tokens, plan.stage2_tokens) for count in plan.per_layer)
    if plan.stage2_layer is None:
        assert plan.stage2_tokens == plan.stage1_tokens
    else:
        assert 1 <= plan.stage2_layer <= num_layers - 1
        assert plan.per_layer[plan.stage2_layer - 1] == plan.stage1_tokens
        assert plan.per_layer[plan.stage2_layer] == plan.stage2_tokens


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(method_names()),
    grid=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    num_layers=st.integers(1, 40),
    budget=st.one_of(st.integers(1, 2000), st.floats(0.001, 1.0)),
    family=st.sampled_from(["llava", "qwen2_5_vl", "generic"]),
)
def test_plans_are_consistent_for_any_input(
    method: str, grid: tuple[int, int], num_layers: int, budget: int | float, family: str
) -> None:
    num_tokens = grid[0] * grid[1]
    plan = plan_tokens(
        PruningConfig(method=method, budget=budget), num_tokens, num_layers, grid, family=family
    )
    _check_plan(plan, num_tokens, num_layers)


def test_nuwa_meets_feasible_budgets_closely() -> None:
    for budget in range(8, 577, 8):
        plan = plan_tokens(PruningConfig(budget=budget), 576, 32, (24, 24), family="llava")
        assert plan.average == pytest.approx(budget, abs=1.0), budget


def test_unreachable_budget_is_clamped_not_faked() -> None:
    # Stage 2 alone at 25% would need a negative count after layer K: keep 1 and report the real average.
    plan = plan_tokens(PruningConfig(method="nuwa_stage2", budget=0.25), 576, 32, (24, 24))
    assert plan.stage2_tokens == 1
    assert plan.average == (16 * 576 + 16 * 1) / 32


def test_nuwa_stage2_meets_a_feasible_budget() -> None:
    plan = plan_tokens(PruningConfig(method="nuwa_stage2", budget=0.75), 576, 32, (24, 24))
    assert plan.stage2_tokens == round(0.75 * 576 * 2 - 576)
    assert plan.average == 0.75 * 576


@pytest.mark.parametrize("method", ["random", "visionzip", "nuwa_stage1"])
def test_single_stage_methods_keep_the_average_everywhere(method: str) -> None:
    plan = plan_tokens(PruningConfig(method=method, budget=0.25), 576, 32, (24, 24))
    assert plan.per_layer == (144,) * 32
    assert plan.stage2_layer is None


def test_pooling_uses_the_scaled_grid() -> None:
    config = PruningConfig(method="pooling", budget=0.25)
    assert pooling_grid(config, (24, 24)) == (12, 12)
    assert plan_tokens(config, 576, 32, (24, 24)).stage1_tokens == 144
    odd = PruningConfig(method="pooling", budget=64)
    assert pooling_grid(odd, (16, 36)) == (round(16 * math.sqrt(64 / 576)), round(36 * math.sqrt(64 / 576)))


@pytest.mark.parametrize("budget", [None, 64, 0.25])
def test_none_ignores_the_budget(budget: int | float | None) -> None:
    config = PruningConfig(method="none", budget=budget)
    plan = plan_tokens(config, 576, 32, (24, 24))
    assert plan.per_layer == (576,) * 32
    assert plan.stage2_layer is None
    assert keep_ratio_of(config, 576) == 1.0


@pytest.mark.parametrize("method", method_names())
def test_no_budget_keeps_everything(method: str) -> None:
    plan = plan_tokens(PruningConfig(method=method), 100, 4, (10, 10))
    assert (plan.stage1_tokens, plan.stage2_tokens, plan.stage2_layer) == (100, 100, None)


def test_keep_ratio_and_target() -> None:
    assert keep_ratio_of(PruningConfig(), 576) == 1.0
    assert keep_ratio_of(PruningConfig(budget=0.25), 576) == 0.25
    assert keep_ratio_of(PruningConfig(budget=144), 576) == 0.25
    assert keep_ratio_of(PruningConfig(budget=10_000), 576) == 1.0
    assert target_tokens(PruningConfig(budget=10_000), 576) == 576
    assert target_tokens(PruningConfig(budget=0.001), 64) == 1


@pytest.mark.parametrize("budget", [0, -1, 1.5, True, False, float("nan"), float("inf"), 0.0, -0.5])
def test_invalid_budgets_are_rejected(budget: object) -> None:
    with pytest.raises(ValidationError):
        PruningConfig(budget=budget)


def test_whole_float_budget_is_a_token_count() -> None:
    config = PruningConfig(budget=64.0)
    assert config.budget == 64 and isinstance(config.budget, int)
    assert isinstance(PruningConfig(budget=1.0).budget, float)  # 1.0 is the keep-all ratio


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "sparsevlm"},
        {"unknown_field": 1},
        {"region_size": 0},
        {"top_n": 0},
        {"stage1_fraction": 1.5},
        {"stage2_ratio": 0.0},
        {"pillar_quantile": 1.5},
        {"similarity_layers": (0.9, 0.5)},
        {"stage2_scoring": "max"},
    ],
)
def test_invalid_config_fields_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        PruningConfig(**kwargs)


def test_config_is_frozen() -> None:
    config = PruningConfig(budget=64)
    with pytest.raises(ValidationError):
        config.budget = 32  # type: ignore[misc]


def test_grid_must_match_token_count() -> None:
    with pytest.raises(ValueError, match="576"):
        plan_tokens(PruningConfig(budget=64), 576, 32, (24, 23))


def test_methods_are_listed_in_order() -> None:
    assert method_names() == (
        "none",
        "random",
        "pooling",
        "fastv",
        "visionzip",
        "nuwa",
        "nuwa_paper",
        "nuwa_stage1",
        "nuwa_stage2",
    )

"""Turn a request's pruning budget into per-stage visual-token counts.

Why this module exists: a user asks for "an average of 64 visual tokens" or "keep 25%", while the pruning code
needs concrete numbers: how many tokens the LLM receives (K1), how many survive the LLM-side drop (K2), at which
layer the drop happens, and how many candidates each 2x2 region offers. The published Nüwa configurations
(LLaVA-1.5: 64/128/192 tokens; Qwen2.5-VL: 25/50/75%) are reproduced exactly, and every other budget, grid and
depth is derived from the same rule: the mean over LLM layers of the visual tokens each layer sees equals the
requested average, as closely as integer counts allow.

This module is pure Python (pydantic, math, typing): the service can plan and account for tokens without torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

Method = Literal["none", "random", "pooling", "fastv", "visionzip", "nuwa", "nuwa_stage1", "nuwa_stage2"]
METHODS: tuple[str, ...] = get_args(Method)
Family = Literal["llava", "qwen2_5_vl", "generic"]
FAMILIES: tuple[str, ...] = get_args(Family)

# Nüwa's LLaVA code keeps K2 = K1 / 7 (112 -> 16, 224 -> 32, 336 -> 48).
LLAVA_STAGE2_RATIO = 1 / 7
# Qwen2.5-VL published settings: keep ratio -> (stage-1 fraction of N, stage-2 fraction of K1, top-n).
QWEN_TABLE: tuple[tuple[float, float, float, int], ...] = (
    (0.25, 0.35, 0.42, 3),
    (0.50, 0.60, 0.66, 3),
    (0.75, 0.85, 0.70, 4),
)
FAMILY_MIN_TOP_N: dict[str, int] = {"llava": 1, "qwen2_5_vl": 3, "generic": 1}


class PruningConfig(BaseModel):
    """How to prune the visual tokens of one request.

    Code defaults of the released Nüwa implementation are the defaults here; the paper's alternatives are
    switches, so both can be measured. See `plan_tokens` for how `budget` becomes per-stage counts.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method = "nuwa"
    budget: int | float | None = None
    # --- stage 1 ---
    region_size: int = Field(default=2, ge=1)
    top_n: int | None = Field(default=None, ge=1)
    stage1_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    salience_key_norm: bool = False
    aggregation: bool = True
    proximity_fraction: float = Field(default=280 / 1058, gt=0.0)
    pillar_quantile: float = Field(default=0.55, ge=0.0, le=1.0)
    pillar_by_key_norm: bool = False
    convex_rows: bool = False
    similarity_layers: tuple[float, float] = (2 / 3, 1.0)
    # --- stage 2 ---
    stage2_layer: int | None = Field(default=None, ge=1)
    stage2_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    stage2_scoring: Literal["last_token_mean", "last3_max", "text_cosine"] = "last_token_mean"
    # --- baselines ---
    fastv_layer: int | None = Field(default=None, ge=1)
    visionzip_contextual_fraction: float = Field(default=10 / 64, ge=0.0, lt=1.0)
    seed: int = 0

    @field_validator("budget", mode="before")
    @classmethod
    def _reject_bool_budget(cls, value: object) -> object:
        # bool is an int subclass: `budget=True` would silently mean "1 token".
        if isinstance(value, bool):
            raise ValueError(
                "budget must be a token count (int >= 1) or a keep ratio (0 < float <= 1), not a bool"
            )
        return value

    @field_validator("budget", mode="after")
    @classmethod
    def _check_budget(cls, value: int | float | None) -> int | float | None:
        if value is None:
            return None
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"budget as a token count must be >= 1, got {value}")
            return value
        if not math.isfinite(value):
            raise ValueError(f"budget must be finite, got {value}")
        if value > 1.0 and value.is_integer():
            return int(value)  # 64.0 means 64 tokens
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"budget as a float is a keep ratio and must satisfy 0 < ratio <= 1 "
                f"(or be a whole number of tokens such as 64.0), got {value}"
            )
        return value

    @model_validator(mode="after")
    def _check_similarity_layers(self) -> PruningConfig:
        start, end = self.similarity_layers
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(
                f"similarity_layers must satisfy 0 <= start < end <= 1, got {self.similarity_layers}"
            )
        return self


@dataclass(frozen=True)
class TokenPlan:
    """Visual-token counts of one image at each stage; `per_layer` is what each LLM layer really sees."""

    method: str
    num_tokens: int
    stage1_tokens: int
    stage2_tokens: int
    stage2_layer: int | None
    top_n: int
    per_layer: tuple[int, ...]

    @property
    def average(self) -> float:
        """Mean over LLM layers of the visual tokens each layer sees (the paper's "average tokens")."""
        return sum(self.per_layer) / len(self.per_layer)


def target_tokens(config: PruningConfig, num_tokens: int) -> int | None:
    """Requested average visual tokens per LLM layer for an image of `num_tokens`, or None for "keep all".

    An int budget is capped at `num_tokens`; a ratio is rounded and kept at least 1.
    """
    budget = config.budget
    if budget is None:
        return None
    if isinstance(budget, int):
        return min(budget, num_tokens)
    return min(num_tokens, max(1, round(budget * num_tokens)))


def keep_ratio_of(config: PruningConfig, num_tokens: int) -> float:
    """The requested average as a fraction of `num_tokens` (1.0 without a budget or for method "none")."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if config.method == "none" or config.budget is None:
        return 1.0
    if isinstance(config.budget, float):
        return config.budget
    return min(config.budget, num_tokens) / num_tokens


def pooling_grid(config: PruningConfig, grid: tuple[int, int]) -> tuple[int, int]:
    """Output grid of the `pooling` baseline: the grid scaled by sqrt(A / N) per side (25% of 24x24 -> 12x12)."""
    grid_h, grid_w = grid
    num_tokens = grid_h * grid_w
    target = target_tokens(config, num_tokens)
    if target is None:
        return grid_h, grid_w
    scale = math.sqrt(target / num_tokens)
    return max(1, round(grid_h * scale)), max(1, round(grid_w * scale))


def plan_tokens(
    config: PruningConfig,
    num_tokens: int,
    num_layers: int,
    grid: tuple[int, int],
    family: Family = "generic",
) -> TokenPlan:
    """Derive the per-stage token counts of one image.

    Rules (N = `num_tokens`, L = `num_layers`, A = requested average tokens per layer):

    * A = the int budget capped at N, or round(ratio * N) (at least 1). No budget -> K1 = K2 = N for every method.
    * ``none``: K1 = K2 = N, the budget is ignored.
    * ``random``, ``visionzip``, ``nuwa_stage1``: every layer sees K1 = A.
    * ``pooling``: every layer sees K1 = Ph * Pw with Ph = max(1, round(Gh * sqrt(A / N))), same for Pw.
    * ``nuwa``: layers < K see K1, layers >= K see K2 (K = `stage2_layer` or L // 2). With stage-2 ratio
      rho = K2 / K1, the average equation A = (K * K1 + (L - K) * K2) / L gives
      K1 = round(A * L / (K + (L - K) * rho)), clamped to 1..N, and K2 = round(rho * K1), clamped to 1..K1.
      rho is 1/7 for ``llava``/``generic``. For ``qwen2_5_vl`` a budget of exactly 25/50/75% (float, or the
      int round(r * N)) uses the published table (K1 = round(f1 * N), K2 = round(rho * K1), top-n 3/3/4);
      other budgets interpolate rho linearly in the keep ratio between table points (clamped outside) and
      solve K1 from the average equation. If that K1 exceeds N (large budgets: rho = 1/7 caps the average at
      about 57% of N), K1 = N and K2 solves the average equation instead, so e.g. 75% is still met.
      Overrides win: `stage1_fraction` fixes K1 = round(f * N) (then K2 = round(rho * K1) when rho is given or
      tabulated, else K2 solves the average equation); `stage2_ratio` fixes rho; `stage2_layer` fixes K.
    * ``nuwa_stage2`` / ``fastv``: layers < K see N, layers >= K see K2 = round((A * L - K * N) / (L - K)),
      clamped to 1..N (K = `stage2_layer` or L // 2 for nuwa_stage2; `fastv_layer` or
      max(1, round(2 * L / 32)) for fastv).
    * K is clamped to 1..L-1, so even 2-layer models get a split. With L == 1 no LLM-side drop is possible:
      ``nuwa`` degrades to stage 1 with K1 = A and ``nuwa_stage2``/``fastv`` keep N.
    * top-n (stage-1 methods only, else 0): `top_n` override, the table value, or ceil(K1 / num_regions) raised to
      the family minimum (llava 1, qwen2_5_vl 3, generic 1) and capped at region_size ** 2.
    * Budgets that cannot be met (stage-2-only at 25% would need a negative K2) are clamped; `per_layer` always
      reports the real counts. `stage2_layer` is None whenever no LLM-side drop happens (K2 == K1).

    Args:
        config: The pruning request.
        num_tokens: N, unpruned visual tokens of this image (the LLM-side count).
        num_layers: L, decoder layers of the LLM.
        grid: (grid_h, grid_w) of the visual tokens; grid_h * grid_w must equal `num_tokens`.
        family: Model family, selects the published configuration.

    Returns:
        The plan, with `per_layer` of length `num_layers`.
    """
    grid_h, grid_w = grid
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if grid_h < 1 or grid_w < 1 or grid_h * grid_w != num_tokens:
        raise ValueError(f"grid {grid_h}x{grid_w} has {grid_h * grid_w} cells but num_tokens is {num_tokens}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")

    method = config.method
    target = target_tokens(config, num_tokens)
    if method == "none" or target is None:
        return _flat_plan(method, num_tokens, num_tokens, num_layers, top_n=0)

    if method in ("random", "visionzip"):
        return _flat_plan(method, num_tokens, target, num_layers, top_n=0)
    if method == "nuwa_stage1":
        top_n = _derive_top_n(config, target, grid, family)
        return _flat_plan(method, num_tokens, target, num_layers, top_n=top_n)
    if method == "pooling":
        pooled_h, pooled_w = pooling_grid(config, grid)
        return _flat_plan(method, num_tokens, pooled_h * pooled_w, num_layers, top_n=0)
    if method in ("nuwa_stage2", "fastv"):
        if num_layers < 2:
            return _flat_plan(method, num_tokens, num_tokens, num_layers, top_n=0)
        if method == "fastv":
            requested = (
                config.fastv_layer if config.fastv_layer is not None else max(1, round(2 * num_layers / 32))
            )
        else:
            requested = config.stage2_layer if config.stage2_layer is not None else num_layers // 2
        split = _clamp_split(requested, num_layers)
        stage2 = round((target * num_layers - split * num_tokens) / (num_layers - split))
        stage2 = _clamp(stage2, 1, num_tokens)
        return _two_stage_plan(method, num_tokens, num_tokens, stage2, split, num_layers, top_n=0)
    if method == "nuwa":
        return _plan_nuwa(config, num_tokens, num_layers, grid, family, target)
    raise ValueError(
        f"unknown method {method!r}; expected one of {METHODS}"
    )  # unreachable: pydantic validates


def _plan_nuwa(
    config: PruningConfig,
    num_tokens: int,
    num_layers: int,
    grid: tuple[int, int],
    family: str,
    target: int,
) -> TokenPlan:
    """Two-stage Nüwa plan; see `plan_tokens` for the rules."""
    if num_layers < 2:
        top_n = _derive_top_n(config, target, grid, family)
        return _flat_plan("nuwa", num_tokens, target, num_layers, top_n=top_n)
    split = _clamp_split(
        config.stage2_layer if config.stage2_layer is not None else num_layers // 2, num_layers
    )

    table_row = _qwen_table_row(config, num_tokens, target) if family == "qwen2_5_vl" else None
    stage1_fraction = config.stage1_fraction
    stage2_ratio = config.stage2_ratio
    if table_row is not None:
        _, table_fraction, table_ratio, _ = table_row
        stage1_fraction = table_fraction if stage1_fraction is None else stage1_fraction
        stage2_ratio = table_ratio if stage2_ratio is None else stage2_ratio

    if stage1_fraction is not None:
        stage1 = _clamp(round(stage1_fraction * num_tokens), 1, num_tokens)
        if stage2_ratio is not None:
            stage2 = round(stage2_ratio * stage1)
        else:  # solve the average equation for K2
            stage2 = round((target * num_layers - split * stage1) / (num_layers - split))
    else:
        if stage2_ratio is None:
            stage2_ratio = (
                _qwen_interpolated_ratio(target / num_tokens)
                if family == "qwen2_5_vl"
                else LLAVA_STAGE2_RATIO
            )
        stage1 = round(target * num_layers / (split + (num_layers - split) * stage2_ratio))
        if stage1 > num_tokens:  # the ratio cannot reach the budget: keep all N, K2 solves the average
            stage1 = num_tokens
            stage2 = round((target * num_layers - split * num_tokens) / (num_layers - split))
        else:
            stage1 = max(stage1, 1)
            stage2 = round(stage2_ratio * stage1)
    stage2 = _clamp(stage2, 1, stage1)

    if config.top_n is not None:
        top_n = config.top_n
    elif table_row is not None:
        top_n = table_row[3]
    else:
        top_n = _derive_top_n(config, stage1, grid, family)
    return _two_stage_plan("nuwa", num_tokens, stage1, stage2, split, num_layers, top_n=top_n)


def _qwen_table_row(
    config: PruningConfig, num_tokens: int, target: int
) -> tuple[float, float, float, int] | None:
    """The published Qwen2.5-VL row whose keep ratio the budget names exactly, else None."""
    budget = config.budget
    for row in QWEN_TABLE:
        ratio = row[0]
        if isinstance(budget, float) and math.isclose(budget, ratio, abs_tol=1e-9):
            return row
        if isinstance(budget, int) and target == round(ratio * num_tokens):
            return row
    return None


def _qwen_interpolated_ratio(keep_ratio: float) -> float:
    """Stage-2 ratio K2/K1 interpolated linearly in the keep ratio between the Qwen table points."""
    points = [(row[0], row[2]) for row in QWEN_TABLE]
    if keep_ratio <= points[0][0]:
        return points[0][1]
    if keep_ratio >= points[-1][0]:
        return points[-1][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= keep_ratio <= x1:
            return y0 + (y1 - y0) * (keep_ratio - x0) / (x1 - x0)
    return points[-1][1]  # unreachable


def _derive_top_n(config: PruningConfig, stage1: int, grid: tuple[int, int], family: str) -> int:
    """Per-region candidates: enough that the regions together can supply K1, within the family's range."""
    if config.top_n is not None:
        return config.top_n
    region = config.region_size
    num_regions = math.ceil(grid[0] / region) * math.ceil(grid[1] / region)
    top_n = max(math.ceil(stage1 / num_regions), FAMILY_MIN_TOP_N[family])
    return min(top_n, region * region)


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def _clamp_split(requested: int, num_layers: int) -> int:
    split = _clamp(requested, 1, num_layers - 1)
    if split != requested:
        logger.debug("stage-2 layer %d clamped to %d for a %d-layer LLM", requested, split, num_layers)
    return split


def _flat_plan(method: str, num_tokens: int, stage1: int, num_layers: int, top_n: int) -> TokenPlan:
    return TokenPlan(
        method=method,
        num_tokens=num_tokens,
        stage1_tokens=stage1,
        stage2_tokens=stage1,
        stage2_layer=None,
        top_n=top_n,
        per_layer=(stage1,) * num_layers,
    )


def _two_stage_plan(
    method: str, num_tokens: int, stage1: int, stage2: int, split: int, num_layers: int, top_n: int
) -> TokenPlan:
    if stage2 >= stage1:  # nothing dropped inside the LLM
        return _flat_plan(method, num_tokens, stage1, num_layers, top_n)
    return TokenPlan(
        method=method,
        num_tokens=num_tokens,
        stage1_tokens=stage1,
        stage2_tokens=stage2,
        stage2_layer=split,
        top_n=top_n,
        per_layer=(stage1,) * split + (stage2,) * (num_layers - split),
    )


__all__ = [
    "FAMILIES",
    "METHODS",
    "Family",
    "Method",
    "PruningConfig",
    "TokenPlan",
    "keep_ratio_of",
    "plan_tokens",
    "pooling_grid",
    "target_tokens",
]

"""Turn a request's pruning budget into per-stage visual-token counts.

Why this module exists: a user asks for "an average of 64 visual tokens" or "keep 25%", while the pruning code
needs concrete numbers: how many tokens the LLM receives (K1), how many survive the LLM-side drop (K2), at which
layer the drop happens, and how many candidates each 2x2 region offers. The published Nüwa configurations
(LLaVA-1.5: 64/128/192 tokens; Qwen2.5-VL: 25/50/75%) are reproduced exactly, and every other budget, grid and
depth is derived from the same rule: the mean over LLM layers of the visual tokens each layer sees equals the
requested average, as closely as integer counts allow.

The rules that belong to one method live in that method's module (`models/methods/`); this module holds what
every method shares: the request (`PruningConfig`), the result (`TokenPlan`), the average-token target and the
plan shapes (flat, two-stage, drop-only) that methods are built from.

This module is pure Python (pydantic, math, typing): the service can plan and account for tokens without torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

Family = Literal["llava", "qwen2_5_vl", "qwen3_vl", "generic"]
FAMILIES: tuple[str, ...] = get_args(Family)

# Fewest stage-1 candidates per 2x2 region, per family (Qwen2.5-VL's released code never offers fewer than 3;
# Qwen3-VL, which has no published setting, takes Qwen2.5-VL's: the same 2x2-merged dynamic-resolution grid).
FAMILY_MIN_TOP_N: dict[str, int] = {"llava": 1, "qwen2_5_vl": 3, "qwen3_vl": 3, "generic": 1}


class PruningConfig(BaseModel):
    """How to prune the visual tokens of one request.

    Code defaults of the released Nüwa implementation are the defaults here; the paper's alternatives are
    switches, so both can be measured. See `plan_tokens` for how `budget` becomes per-stage counts.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = "nuwa"
    budget: int | float | None = None
    # --- stage 1 ---
    region_size: int = Field(default=2, ge=1)
    top_n: int | None = Field(default=None, ge=1)
    stage1_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    salience_key_norm: bool = False
    salience_source: Literal["attention", "distinct", "attention_distinct"] = "attention"
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

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from models.methods import method_names

        names = method_names()
        if value not in names:
            raise ValueError(f"unknown method {value!r}; expected one of {names}")
        return value

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


@dataclass(frozen=True)
class PlanShape:
    """What a plan depends on besides the request: the image's token grid and the LLM's depth.

    Attributes:
        num_tokens: N, unpruned visual tokens of the image (the LLM-side count).
        num_layers: L, decoder layers of the LLM.
        grid: (grid_h, grid_w) of the visual tokens; grid_h * grid_w == num_tokens.
        family: Model family, which selects published configurations.
    """

    num_tokens: int
    num_layers: int
    grid: tuple[int, int]
    family: Family


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
    """The requested average as a fraction of `num_tokens` (1.0 without a budget or for a method that keeps all)."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    from models.methods import get_method

    if not get_method(config.method).prunes or config.budget is None:
        return 1.0
    if isinstance(config.budget, float):
        return config.budget
    return min(config.budget, num_tokens) / num_tokens


def plan_tokens(
    config: PruningConfig,
    num_tokens: int,
    num_layers: int,
    grid: tuple[int, int],
    family: Family = "generic",
) -> TokenPlan:
    """Derive the per-stage token counts of one image for the request's method.

    The shared rules (each method's own rules are in its module under `models/methods/`; N = `num_tokens`,
    L = `num_layers`, A = requested average tokens per layer):

    * A = the int budget capped at N, or round(ratio * N) (at least 1). No budget -> K1 = K2 = N for every method.
    * K (the layer of an LLM-side drop) is clamped to 1..L-1, so even 2-layer models get a split. With L == 1 no
      LLM-side drop is possible.
    * top-n (stage-1 methods only, else 0): `top_n` override, a published value, or ceil(K1 / num_regions)
      raised to the family minimum (llava 1, qwen2_5_vl 3, qwen3_vl 3, generic 1) and capped at region_size ** 2.
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
    from models.methods import get_method

    grid_h, grid_w = grid
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if grid_h < 1 or grid_w < 1 or grid_h * grid_w != num_tokens:
        raise ValueError(f"grid {grid_h}x{grid_w} has {grid_h * grid_w} cells but num_tokens is {num_tokens}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    target = target_tokens(config, num_tokens)
    if target is None:
        return flat_plan(config.method, num_tokens, num_tokens, num_layers, top_n=0)
    shape = PlanShape(num_tokens=num_tokens, num_layers=num_layers, grid=grid, family=family)
    return get_method(config.method).plan(config, shape, target)


def derive_top_n(config: PruningConfig, stage1: int, grid: tuple[int, int], family: str) -> int:
    """Per-region candidates: enough that the regions together can supply K1, within the family's range."""
    if config.top_n is not None:
        return config.top_n
    region = config.region_size
    num_regions = math.ceil(grid[0] / region) * math.ceil(grid[1] / region)
    top_n = max(math.ceil(stage1 / num_regions), FAMILY_MIN_TOP_N[family])
    return min(top_n, region * region)


def clamp(value: int, low: int, high: int) -> int:
    """`value` limited to [low, high]."""
    return max(low, min(high, value))


def clamp_split(requested: int, num_layers: int) -> int:
    """An LLM-side drop layer limited to 1..L-1 (there must be a layer before and after it)."""
    split = clamp(requested, 1, num_layers - 1)
    if split != requested:
        logger.debug("stage-2 layer %d clamped to %d for a %d-layer LLM", requested, split, num_layers)
    return split


def flat_plan(method: str, num_tokens: int, stage1: int, num_layers: int, top_n: int) -> TokenPlan:
    """Every LLM layer sees the same `stage1` tokens (no LLM-side drop)."""
    return TokenPlan(
        method=method,
        num_tokens=num_tokens,
        stage1_tokens=stage1,
        stage2_tokens=stage1,
        stage2_layer=None,
        top_n=top_n,
        per_layer=(stage1,) * num_layers,
    )


def two_stage_plan(
    method: str, num_tokens: int, stage1: int, stage2: int, split: int, num_layers: int, top_n: int
) -> TokenPlan:
    """Layers before `split` see `stage1` tokens, later layers `stage2` (flat when nothing is dropped)."""
    if stage2 >= stage1:  # nothing dropped inside the LLM
        return flat_plan(method, num_tokens, stage1, num_layers, top_n)
    return TokenPlan(
        method=method,
        num_tokens=num_tokens,
        stage1_tokens=stage1,
        stage2_tokens=stage2,
        stage2_layer=split,
        top_n=top_n,
        per_layer=(stage1,) * split + (stage2,) * (num_layers - split),
    )


def drop_only_plan(method: str, shape: PlanShape, target: int, requested_layer: int) -> TokenPlan:
    """All N tokens up to layer K, then K2 = round((A * L - K * N) / (L - K)) clamped to 1..N (FastV, stage 2).

    With one LLM layer nothing can be dropped and every layer sees N.
    """
    num_tokens, num_layers = shape.num_tokens, shape.num_layers
    if num_layers < 2:
        return flat_plan(method, num_tokens, num_tokens, num_layers, top_n=0)
    split = clamp_split(requested_layer, num_layers)
    stage2 = round((target * num_layers - split * num_tokens) / (num_layers - split))
    stage2 = clamp(stage2, 1, num_tokens)
    return two_stage_plan(method, num_tokens, num_tokens, stage2, split, num_layers, top_n=0)


__all__ = [
    "FAMILIES",
    "Family",
    "PlanShape",
    "PruningConfig",
    "TokenPlan",
    "clamp",
    "clamp_split",
    "derive_top_n",
    "drop_only_plan",
    "flat_plan",
    "keep_ratio_of",
    "plan_tokens",
    "target_tokens",
    "two_stage_plan",
]

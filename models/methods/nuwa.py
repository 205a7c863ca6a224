"""`nuwa`: the full method. Stage 1 after the vision encoder (separation, alignment, aggregation), stage 2 in the
middle of the LLM (text-guided drop). Kept tokens keep their ORIGINAL positions.

Stage 1 (`select`), per image:
1. separation + alignment: each `region_size` x `region_size` region offers its top-n tokens by salience, and the
   best K1 of those candidates are kept, in raster order (`pruning.select_stage1`);
2. aggregation: every kept non-pillar token absorbs its similar neighbours, weighted by ReLU(cosine) times spatial
   proximity (`pruning.aggregate`), so what was pruned is not simply lost.

The plan (`plan`): layers < K see K1, layers >= K see K2 (K = `stage2_layer` or L // 2). With stage-2 ratio
rho = K2 / K1, the average equation A = (K * K1 + (L - K) * K2) / L gives K1 = round(A * L / (K + (L - K) * rho)),
clamped to 1..N, and K2 = round(rho * K1), clamped to 1..K1. rho is 1/7 for `llava`/`generic` (Nüwa's LLaVA code:
112 -> 16, 224 -> 32, 336 -> 48). For `qwen2_5_vl` (and `qwen3_vl`, see below) a budget of exactly
25/50/75% (float, or the int round(r * N)) uses the published table (K1 = round(f1 * N), K2 = round(rho * K1),
top-n 3/3/4); other budgets interpolate rho linearly in the keep ratio between table points (clamped outside)
and solve K1 from the average equation. If that K1 exceeds N (large budgets: rho = 1/7 caps the average at
about 57% of N), K1 = N and K2 solves the average equation instead, so e.g. 75% is still met. Overrides win:
`stage1_fraction` fixes K1 = round(f * N) (then K2 = round(rho * K1) when rho is given or tabulated, else K2
solves the average equation); `stage2_ratio` fixes rho; `stage2_layer` fixes K. With one LLM layer, Nüwa
degrades to stage 1 with K1 = A.

Qwen3-VL has no published setting; it takes the Qwen2.5-VL rules (table, interpolation, top-n >= 3, K = L // 2)
rather than LLaVA's 1/7: it is the same lineage with the same 2x2-merged dynamic-resolution grid, so its images
carry hundreds to thousands of tokens as Qwen2.5-VL's do, not LLaVA's fixed 576. No rule of its own is needed
for DeepStack: the adapter injects the DeepStack levels in whatever layout the drop leaves (`models/qwen3_vl.py`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from models.budget import (
    PlanShape,
    PruningConfig,
    TokenPlan,
    clamp,
    clamp_split,
    derive_top_n,
    flat_plan,
    two_stage_plan,
)
from models.methods.base import PruningMethod, Stage1Selection

if TYPE_CHECKING:
    import torch

    from models.engine import EncodedImage

LLAVA_STAGE2_RATIO = 1 / 7
"""K2 / K1 of Nüwa's LLaVA code (112 -> 16, 224 -> 32, 336 -> 48)."""

QWEN_TABLE: tuple[tuple[float, float, float, int], ...] = (
    (0.25, 0.35, 0.42, 3),
    (0.50, 0.60, 0.66, 3),
    (0.75, 0.85, 0.70, 4),
)
"""Qwen2.5-VL published settings: keep ratio -> (stage-1 fraction of N, stage-2 fraction of K1, top-n)."""

QWEN_TABLE_FAMILIES = frozenset({"qwen2_5_vl", "qwen3_vl"})
"""Families planned with `QWEN_TABLE` (Qwen3-VL by choice, see the module docstring)."""


class Nuwa(PruningMethod):
    """Both stages (see the module docstring)."""

    name = "nuwa"

    def plan(self, config: PruningConfig, shape: PlanShape, target: int) -> TokenPlan:
        num_tokens, num_layers, grid, family = shape.num_tokens, shape.num_layers, shape.grid, shape.family
        if num_layers < 2:
            top_n = derive_top_n(config, target, grid, family)
            return flat_plan(self.name, num_tokens, target, num_layers, top_n=top_n)
        split = clamp_split(
            config.stage2_layer if config.stage2_layer is not None else num_layers // 2, num_layers
        )
        qwen_rules = family in QWEN_TABLE_FAMILIES
        table_row = _qwen_table_row(config, num_tokens, target) if qwen_rules else None
        stage1_fraction = config.stage1_fraction
        stage2_ratio = config.stage2_ratio
        if table_row is not None:
            _, table_fraction, table_ratio, _ = table_row
            stage1_fraction = table_fraction if stage1_fraction is None else stage1_fraction
            stage2_ratio = table_ratio if stage2_ratio is None else stage2_ratio

        if stage1_fraction is not None:
            stage1 = clamp(round(stage1_fraction * num_tokens), 1, num_tokens)
            if stage2_ratio is not None:
                stage2 = round(stage2_ratio * stage1)
            else:  # solve the average equation for K2
                stage2 = round((target * num_layers - split * stage1) / (num_layers - split))
        else:
            if stage2_ratio is None:
                stage2_ratio = (
                    _qwen_interpolated_ratio(target / num_tokens) if qwen_rules else LLAVA_STAGE2_RATIO
                )
            stage1 = round(target * num_layers / (split + (num_layers - split) * stage2_ratio))
            if stage1 > num_tokens:  # the ratio cannot reach the budget: keep all N, K2 solves the average
                stage1 = num_tokens
                stage2 = round((target * num_layers - split * num_tokens) / (num_layers - split))
            else:
                stage1 = max(stage1, 1)
                stage2 = round(stage2_ratio * stage1)
        stage2 = clamp(stage2, 1, stage1)

        if config.top_n is not None:
            top_n = config.top_n
        elif table_row is not None:
            top_n = table_row[3]
        else:
            top_n = derive_top_n(config, stage1, grid, family)
        return two_stage_plan(self.name, num_tokens, stage1, stage2, split, num_layers, top_n=top_n)

    def needs_similarity(self, config: PruningConfig) -> bool:
        # The semantic term of the aggregation weights; without a budget every token is kept and nothing merges.
        return config.aggregation and config.budget is not None

    def select(self, encoded: EncodedImage, config: PruningConfig, plan: TokenPlan) -> Stage1Selection:
        from models import pruning

        features, grid = encoded.features, encoded.grid
        salience = stage1_salience(encoded, config)
        index = pruning.select_stage1(salience, grid, plan.stage1_tokens, plan.top_n, config.region_size)
        index = index.to(features.device)
        if not config.aggregation:
            return Stage1Selection(features[index], index)
        kept = pruning.aggregate(
            features,
            encoded.similarity,
            salience,
            index,
            grid,
            pruning.proximity_radius(grid, config.proximity_fraction),
            pillar_quantile=config.pillar_quantile,
            convex_rows=config.convex_rows,
            pillar_scores=encoded.key_norm if config.pillar_by_key_norm else None,
        )
        return Stage1Selection(kept, index)


def stage1_salience(encoded: EncodedImage, config: PruningConfig) -> torch.Tensor:
    """The score stage 1 ranks tokens by (`PruningConfig.salience_source`, times the key norm if asked).

    `attention` is the paper's m; `distinct` is `pruning.distinctness` of the encoder features (which tokens
    differ from the image as a whole: object tokens, not background); `attention_distinct` is their product.
    """
    from models import pruning

    source = config.salience_source
    if source == "attention":
        salience = encoded.salience
    else:
        distinct = (
            encoded.distinct if encoded.distinct is not None else pruning.distinctness(encoded.features)
        )
        salience = distinct.to(encoded.salience.device)
        if source == "attention_distinct":
            salience = salience * encoded.salience.float()
    if config.salience_key_norm and encoded.key_norm is not None:
        salience = salience * encoded.key_norm
    return salience


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


METHOD = Nuwa()
"""The method this module adds (`models/methods/__init__.py` registers it)."""

__all__ = ["METHOD", "LLAVA_STAGE2_RATIO", "QWEN_TABLE", "QWEN_TABLE_FAMILIES", "Nuwa"]

"""`pooling`: adaptive 2-D average pooling of the token grid (exactly 2x2 at 25% of an even grid).

Each pooled token takes the position of the patch nearest its cell's centre, so the pooled grid keeps the image's
spatial layout at a coarser resolution.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from models.budget import PlanShape, PruningConfig, TokenPlan, flat_plan, target_tokens
from models.methods.base import PruningMethod, Stage1Selection

if TYPE_CHECKING:
    from models.engine import EncodedImage


def pooling_grid(config: PruningConfig, grid: tuple[int, int]) -> tuple[int, int]:
    """Output grid of the `pooling` baseline: the grid scaled by sqrt(A / N) per side (25% of 24x24 -> 12x12)."""
    grid_h, grid_w = grid
    num_tokens = grid_h * grid_w
    target = target_tokens(config, num_tokens)
    if target is None:
        return grid_h, grid_w
    scale = math.sqrt(target / num_tokens)
    return max(1, round(grid_h * scale)), max(1, round(grid_w * scale))


class GridPooling(PruningMethod):
    """Every LLM layer sees K1 = Ph * Pw pooled tokens, Ph = max(1, round(Gh * sqrt(A / N))), same for Pw."""

    name = "pooling"

    def plan(self, config: PruningConfig, shape: PlanShape, target: int) -> TokenPlan:
        pooled_h, pooled_w = pooling_grid(config, shape.grid)
        return flat_plan(self.name, shape.num_tokens, pooled_h * pooled_w, shape.num_layers, top_n=0)

    def select(self, encoded: EncodedImage, config: PruningConfig, plan: TokenPlan) -> Stage1Selection:
        from models import pruning

        features = encoded.features
        pooled, index = pruning.pool_grid(features, encoded.grid, pooling_grid(config, encoded.grid))
        return Stage1Selection(pooled, index.to(features.device))


METHOD = GridPooling()
"""The method this module adds (`models/methods/__init__.py` registers it)."""

__all__ = ["METHOD", "GridPooling", "pooling_grid"]

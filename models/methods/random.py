"""`random`: K1 tokens drawn uniformly after the vision encoder, at their original positions (a sanity floor).

The draw is seeded per request (`PruningConfig.seed`) and depends only on (N, K1, seed), so a sample keeps the
same tokens alone and inside a batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.budget import PlanShape, PruningConfig, TokenPlan, flat_plan
from models.methods.base import PruningMethod, Stage1Selection

if TYPE_CHECKING:
    from models.engine import EncodedImage


class RandomPruning(PruningMethod):
    """Every LLM layer sees K1 = A uniformly drawn tokens."""

    name = "random"

    def plan(self, config: PruningConfig, shape: PlanShape, target: int) -> TokenPlan:
        return flat_plan(self.name, shape.num_tokens, target, shape.num_layers, top_n=0)

    def select(self, encoded: EncodedImage, config: PruningConfig, plan: TokenPlan) -> Stage1Selection:
        from models import pruning

        features = encoded.features
        index = pruning.select_random(encoded.num_tokens, plan.stage1_tokens, config.seed).to(features.device)
        return Stage1Selection(features[index], index)


METHOD = RandomPruning()
"""The method this module adds (`models/methods/__init__.py` registers it)."""

__all__ = ["METHOD", "RandomPruning"]

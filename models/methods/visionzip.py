"""`visionzip`: dominant tokens by salience plus a few contextual tokens merged by key similarity.

As VisionZip does, the kept tokens' positions are renumbered densely (compressed): this is the baseline that shows
what losing the position frame costs grounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.budget import PlanShape, PruningConfig, TokenPlan, flat_plan
from models.methods.base import PruningMethod, Stage1Selection

if TYPE_CHECKING:
    from models.engine import EncodedImage


class VisionZip(PruningMethod):
    """Every LLM layer sees K1 = A tokens: dominant ones, then `visionzip_contextual_fraction` merged ones."""

    name = "visionzip"

    def plan(self, config: PruningConfig, shape: PlanShape, target: int) -> TokenPlan:
        return flat_plan(self.name, shape.num_tokens, target, shape.num_layers, top_n=0)

    def needs_similarity(self, config: PruningConfig) -> bool:
        return True  # contextual tokens merge by similarity

    def select(self, encoded: EncodedImage, config: PruningConfig, plan: TokenPlan) -> Stage1Selection:
        from models import pruning

        kept, index = pruning.visionzip_merge(
            encoded.features,
            encoded.similarity,
            encoded.salience,
            plan.stage1_tokens,
            config.visionzip_contextual_fraction,
        )
        return Stage1Selection(kept, index.to(encoded.features.device), compressed_positions=True)


METHOD = VisionZip()
"""The method this module adds (`models/methods/__init__.py` registers it)."""

__all__ = ["METHOD", "VisionZip"]

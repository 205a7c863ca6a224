"""`nuwa_stage1`: Nüwa's stage 1 alone (separation, alignment, aggregation); every LLM layer sees K1 = A tokens."""

from __future__ import annotations

from models.budget import PlanShape, PruningConfig, TokenPlan, derive_top_n, flat_plan
from models.methods.nuwa import Nuwa


class NuwaStage1(Nuwa):
    """Nüwa's selection (inherited `select`) with a flat plan: no LLM-side drop."""

    name = "nuwa_stage1"

    def plan(self, config: PruningConfig, shape: PlanShape, target: int) -> TokenPlan:
        top_n = derive_top_n(config, target, shape.grid, shape.family)
        return flat_plan(self.name, shape.num_tokens, target, shape.num_layers, top_n=top_n)


METHOD = NuwaStage1()
"""The method this module adds (`models/methods/__init__.py` registers it)."""

__all__ = ["METHOD", "NuwaStage1"]

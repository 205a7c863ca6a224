"""`nuwa_stage2`: Nüwa's text-guided drop in the middle of the LLM alone (all N tokens before it)."""

from __future__ import annotations

from models.budget import PlanShape, PruningConfig, TokenPlan, drop_only_plan
from models.methods.base import PruningMethod


class NuwaStage2(PruningMethod):
    """Layers < K see N, layers >= K see K2 = round((A * L - K * N) / (L - K)); K = `stage2_layer` or L // 2."""

    name = "nuwa_stage2"

    def plan(self, config: PruningConfig, shape: PlanShape, target: int) -> TokenPlan:
        requested = config.stage2_layer if config.stage2_layer is not None else shape.num_layers // 2
        return drop_only_plan(self.name, shape, target, requested)


METHOD = NuwaStage2()
"""The method this module adds (`models/methods/__init__.py` registers it)."""

__all__ = ["METHOD", "NuwaStage2"]

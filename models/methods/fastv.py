"""`fastv`: all tokens up to an early LLM layer, then the top-K2 by the last prompt token's attention.

FastV drops at layer 2 of 32; on other depths the layer scales with the depth (`fastv_layer` overrides it). Its
score is always the last prompt token's attention, mean over heads, whatever `stage2_scoring` says.
"""

from __future__ import annotations

from models.budget import PlanShape, PruningConfig, TokenPlan, drop_only_plan
from models.methods.base import PruningMethod


class FastV(PruningMethod):
    """Layers < K see N, layers >= K see K2 = round((A * L - K * N) / (L - K)); K = max(1, round(2 L / 32))."""

    name = "fastv"

    def plan(self, config: PruningConfig, shape: PlanShape, target: int) -> TokenPlan:
        layers = shape.num_layers
        requested = config.fastv_layer if config.fastv_layer is not None else max(1, round(2 * layers / 32))
        return drop_only_plan(self.name, shape, target, requested)

    def stage2_scoring(self, config: PruningConfig) -> str:
        return "last_token_mean"


METHOD = FastV()
"""The method this module adds (`models/methods/__init__.py` registers it)."""

__all__ = ["METHOD", "FastV"]

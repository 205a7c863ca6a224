"""`none`: every visual token, unchanged: the unpruned reference every retention number is measured against."""

from __future__ import annotations

from models.budget import PlanShape, PruningConfig, TokenPlan, flat_plan
from models.methods.base import PruningMethod


class NoPruning(PruningMethod):
    """Keeps all N tokens in every layer and ignores the budget."""

    name = "none"
    prunes = False

    def plan(self, config: PruningConfig, shape: PlanShape, target: int) -> TokenPlan:
        return flat_plan(self.name, shape.num_tokens, shape.num_tokens, shape.num_layers, top_n=0)


METHOD = NoPruning()
"""The method this module adds (`models/methods/__init__.py` registers it)."""

__all__ = ["METHOD", "NoPruning"]

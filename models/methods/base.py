"""The contract of a pruning method: a plan from a budget, a stage-1 selection, a stage-2 scoring.

Why a small class per method instead of `if method == ...` branches: the planner, the engine's stage 1 and the
LLM-side drop each need to know what a method does, and a method named in four places is a method added in four
places. A method here answers three questions, and the engine asks only these:

1. `plan`: how many visual tokens each LLM layer sees (K1 after the vision encoder, K2 after the drop at layer K),
   for an image of N tokens on a grid, given the requested average;
2. `select`: which of the N tokens the LLM receives (their features, possibly merged, and the grid index whose
   ORIGINAL position each kept token takes);
3. `stage2_scoring`: how the LLM-side drop scores the visual tokens (when the plan drops any).

This module and every method module import no torch at import time, so the API process can validate method
names and plan budgets without loading the model stack; `select` imports the tensor maths when it runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from models.budget import PlanShape, PruningConfig, TokenPlan

if TYPE_CHECKING:
    import torch

    from models.engine import EncodedImage


@dataclass(frozen=True)
class Stage1Selection:
    """The visual tokens the LLM receives instead of the N encoder tokens.

    Attributes:
        features: `(K1, D)` kept (or merged) features, still in the encoder's feature space (not yet projected).
        source_index: `torch.LongTensor` of shape `(K1,)`: the grid index whose position each kept token takes.
        compressed_positions: True when positions are renumbered densely instead of kept (VisionZip does this).
    """

    features: torch.Tensor
    source_index: torch.Tensor
    compressed_positions: bool = False


def keep_every_token(encoded: EncodedImage) -> Stage1Selection:
    """The identity selection: every token, unchanged, at its own position."""
    import torch

    features = encoded.features
    return Stage1Selection(features, torch.arange(features.shape[0], device=features.device))


class PruningMethod(ABC):
    """One pruning method (see the module docstring). Subclasses set `name` and implement `plan`.

    Attributes:
        name: What requests call it (`PruningConfig.method`).
        prunes: False for a method that ignores the budget and keeps every token (`none`): the service neither
            degrades it under load nor reports a budget for it.
    """

    name: ClassVar[str]
    prunes: ClassVar[bool] = True

    @abstractmethod
    def plan(self, config: PruningConfig, shape: PlanShape, target: int) -> TokenPlan:
        """Per-stage token counts for an image of `shape` when the request asks for `target` average tokens.

        Args:
            config: The request's pruning config (its overrides, e.g. `stage2_layer`, apply here).
            shape: Grid, token count, LLM depth and family.
            target: Requested average visual tokens per LLM layer, 1..N (a request without a budget never
                reaches a method: every method keeps all N then).
        """

    def select(self, encoded: EncodedImage, config: PruningConfig, plan: TokenPlan) -> Stage1Selection:
        """Stage 1: the tokens the LLM receives. Default: all of them (methods that prune only in the LLM)."""
        return keep_every_token(encoded)

    def needs_similarity(self, config: PruningConfig) -> bool:
        """Whether `select` reads `EncodedImage.similarity` (the mean of middle-to-late encoder layers).

        False lets the vision side skip what only the similarity needs (LLaVA: the CLIP layers after the feature
        layer) and leave `similarity` None; the embedding cache keys such entries apart.
        """
        return False

    def stage2_scoring(self, config: PruningConfig) -> str:
        """How the LLM-side drop scores visual tokens (see `models.stage2.DropPlan`); used only if the plan drops."""
        return config.stage2_scoring


__all__ = ["PruningMethod", "Stage1Selection", "keep_every_token"]

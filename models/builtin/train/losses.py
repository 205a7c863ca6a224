"""The answer loss: cross-entropy on answer tokens, with a soft ordinal target for location tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.boxes import LOC_BINS
from models.builtin.data import IGNORE_INDEX


def answer_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Module,
    loc_offset: int,
    sigma: float,
    soft_weight: float,
    per_example: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on answer positions, with the soft ordinal target for location tokens.

    Args:
        hidden_states: `torch.FloatTensor` of shape `(B, L, H)`, the LLM's last hidden states.
        labels: `torch.LongTensor` of shape `(B, L)`, -100 except answer tokens (not yet shifted).
        lm_head: The output projection (only applied to answer positions, which saves most of its cost).
        loc_offset: Token id of `<loc_0>`.
        sigma: Gaussian width in bins.
        soft_weight: Weight of the soft target (0 gives plain cross-entropy).
        per_example: Average over each example's answer tokens first, then over examples (see the module doc).

    Returns:
        (mean loss over answer tokens, {"token_acc", "loc_acc", "loc_abs_err"} for logging).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logits = lm_head(hidden_states[:, :-1][mask]).float()  # (N, V)
    targets = targets[mask]
    log_probs = F.log_softmax(logits, dim=-1)
    losses = -log_probs.gather(1, targets[:, None]).squeeze(1)
    loc_index = targets - loc_offset
    is_loc = (loc_index >= 0) & (loc_index < LOC_BINS)
    stats: dict[str, float] = {"token_acc": (logits.argmax(-1) == targets).float().mean().item()}
    if is_loc.any():
        bins = torch.arange(LOC_BINS, device=logits.device, dtype=torch.float32)
        centre = loc_index[is_loc].float()[:, None]
        if soft_weight > 0:
            gauss = torch.exp(-0.5 * ((bins[None, :] - centre) / sigma) ** 2)
            gauss = gauss / gauss.sum(-1, keepdim=True)
            loc_log_probs = log_probs[is_loc][:, loc_offset : loc_offset + LOC_BINS]
            soft = -(gauss * loc_log_probs).sum(-1)
            losses = losses.clone()
            losses[is_loc] = (1 - soft_weight) * losses[is_loc] + soft_weight * soft
        predicted = logits[is_loc].argmax(-1) - loc_offset
        stats["loc_acc"] = (predicted == loc_index[is_loc]).float().mean().item()
        stats["loc_abs_err"] = (predicted.float() - centre.squeeze(1)).abs().mean().item()
    if per_example:
        token_weights = (1.0 / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(mask)[mask]
        return (losses * token_weights).sum() / token_weights.sum(), stats
    return losses.mean(), stats


def answer_start_positions(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the position whose output predicts the first answer token (the one before the first label)."""
    return (labels != IGNORE_INDEX).float().argmax(-1) - 1


__all__ = ["answer_loss", "answer_start_positions"]

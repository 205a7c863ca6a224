"""Train the built-in model, one curriculum stage at a time, resumably.

``python -m models.train --out DIR --stage single --steps 20000 [--init DIR] [--resume] ...``

* Data: `models.builtin.data.SceneBatches` in DataLoader workers (scenes drawn straight into tensors).
* Optimiser: AdamW (no weight decay on norms, biases and embeddings: the `<loc_k>` rows carry an ordinal code
  that decay would erode), linear warm-up then cosine decay to 10% of the peak, gradient clipping at 1.0.
* Loss: cross-entropy on answer tokens and `</s>` only. For a `<loc_k>` target the target distribution is
  ``(1 - w) * onehot(k) + w * gauss(k, sigma)``, the Gaussian taken over the 1000 location bins and renormalised
  there (default w = 0.5, sigma = 8 bins, i.e. 2.7 px at 336 px, a tenth of a 28 px patch). The soft part tells
  the tiny model that a near miss is better than a far one (the hard target alone treats bin k+1 like bin 0);
  the hard part keeps the mode sharp for greedy decoding. sigma is wider than a few bins because 1000 bins are
  finer than anything the 12x12 patch grid resolves, and an Acc@0.5 hit tolerates several pixels of error.
* Auxiliary loss (``--aux-weight``, default 0.5): a training-only linear probe (`PatchHead`) on the visual
  tokens predicts each patch's colour shares, shape shares and grid position (targets from
  `data.patch_targets`). Without it the from-scratch vision tower collapsed to a constant output within ~100
  steps (see `PatchHead`); the probe is saved in trainer_state.pt only, never in the model directory.
* Evaluation every ``--eval-every`` steps: greedy `generate()` through the real processor on a held-out set of
  the stage's own items and on the first items of `scenes.evaluation_set` (Acc@0.5 and VQA exact match, also
  per kind), appended to DIR/metrics.jsonl with the training loss.
* Checkpoints: DIR/checkpoint (a loadable model directory: model + processor) and DIR/trainer_state.pt
  (optimizer, scheduler, probe, step, RNG states). ``--resume`` continues exactly: the data stream is a pure function of
  (seed, step). ``--resume --steps N`` with a larger N extends the run (the cosine restarts from its new
  schedule position). Each stage of the curriculum starts from the previous stage with ``--init PREV_DIR``.
* CUDA when present, else CPU with ``--threads`` torch threads. ``--precision auto`` is bf16 autocast on CUDA and
  fp32 on CPU; ``--precision bf16`` on a CPU with AVX512-BF16 was measured 2.5x faster per step than fp32 with one
  thread (0.85 s vs 2.1 s at batch 16, 2 threads vs 1), the master weights and optimizer staying fp32.
* ``--example-weighting``: every example weighs the same in the answer loss, however many answer tokens it has.
  With the plain token mean a grounding item (4 location tokens + ``</s>``) outweighed a question (a word +
  ``</s>``) 2.5 to 1, and the questions stayed at answer priors while grounding rose (stage ``single``, step 750).
* ``--attn-weight`` with ``--attn-layers``, ``--attn-heads``, ``--attn-positions``, ``--attn-questions``: the
  `AttentionProbe` loss tells LLM heads where in the image the prompt's object is. One head of the middle layer
  was not enough (the box was read from other layers' reads of other objects); every head of layers 2-7 at every
  location token took the evaluation-set grounding from 0.35 to 0.84 (docs/MODEL.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    ProcessorMixin,
)
from transformers.models.llama.modeling_llama import rotate_half

from models import scenes
from models.builtin.build import TINY_OVERRIDES, build_builtin
from models.builtin.data import (
    IGNORE_INDEX,
    PATCH_TARGET_DIM,
    PROMPT_ATTRIBUTE_CLASSES,
    STAGES,
    Example,
    SceneBatches,
    make_loader,
    official_eval_examples,
    stage_eval_examples,
)
from models.grounding import LOC_BINS, parse_boxes, resize_frame, to_pixels

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the built-in tiny LLaVA on synthetic scenes.")
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--steps", required=True, type=int, help="total optimizer steps of this stage")
    parser.add_argument("--init", type=Path, help="start from this model dir (or run dir with checkpoint/)")
    parser.add_argument("--resume", action="store_true", help="continue DIR from its trainer_state.pt")
    parser.add_argument(
        "--stop-at", type=int, default=None, help="save and exit at this step (schedule still spans --steps)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    parser.add_argument(
        "--vision-lr-scale", type=float, default=1.0, help="LR multiplier of the vision tower and projector"
    )
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--grounding-fraction", type=float, default=0.6)
    parser.add_argument(
        "--kind-weights",
        type=_kind_weights,
        default={},
        help="stage all: relative weights of item kinds, e.g. 'vqa/count=2,ground/color_object=1.5' (others: 1)",
    )
    parser.add_argument("--aux-weight", type=float, default=0.5, help="weight of the PatchHead loss (0: off)")
    parser.add_argument(
        "--aux-object-weight",
        type=float,
        default=1.0,
        help="PatchHead weight of object patches relative to background ones (1: plain mean)",
    )
    parser.add_argument(
        "--attn-weight",
        type=float,
        default=0.0,
        help="weight of the AttentionProbe loss (mid-LLM heads look at what the prompt names; 0: off)",
    )
    parser.add_argument(
        "--attn-layers",
        type=_int_list,
        default=None,
        help="comma-separated LLM layers the AttentionProbe supervises (default: the middle one)",
    )
    parser.add_argument(
        "--attn-heads",
        type=_heads_list,
        default="0",
        help="comma-separated query heads the AttentionProbe supervises in each layer, or 'all'",
    )
    parser.add_argument(
        "--attn-positions",
        type=int,
        default=1,
        help="answer positions per row the AttentionProbe supervises (4: every location token of a box)",
    )
    parser.add_argument(
        "--attn-questions",
        action="store_true",
        help="also supervise questions, at the objects they name (data.attention_target_shares)",
    )
    parser.add_argument(
        "--phrase-weight",
        type=float,
        default=0.0,
        help="weight of the PhraseHead loss (the answer position must know what the prompt names; 0: off)",
    )
    parser.add_argument(
        "--phrase-layer", type=int, default=None, help="residual stream read by PhraseHead (default: middle)"
    )
    parser.add_argument(
        "--image-token-norm",
        type=float,
        default=None,
        help="at the start of a run (not on --resume), rescale the projector so visual tokens have this mean norm",
    )
    parser.add_argument("--loc-sigma", type=float, default=8.0, help="Gaussian width in location bins")
    parser.add_argument("--loc-soft-weight", type=float, default=0.5, help="share of the soft loc target")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-items", type=int, default=200, help="items per evaluation set")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU",
    )
    parser.add_argument(
        "--example-weighting",
        action="store_true",
        help="weigh examples equally in the answer loss (default: every answer token equally)",
    )
    parser.add_argument(
        "--num-workers", type=int, default=None, help="DataLoader workers (1 on CPU, 4 on CUDA)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="fresh model uses the test-sized config")
    return parser.parse_args(argv)


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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, as `generate()` derives them, so padding side never matters."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class PatchHead(torch.nn.Module):
    """Training-only probe on the visual tokens the LLM receives (never saved into the model directory).

    Predicts, per visual token, the colour shares and shape shares of its patch and the patch's grid position.
    Measured without it (stage ``single``, lr 3e-4 to 1e-3): the vision pathway collapsed within ~100 steps to
    one constant token (``image_token_spread`` 0.4 -> <0.01), because the LLM first learns answer priors and the
    noise-driven Adam updates of an ignored ViT drift to a constant; the model then answered every image alike.
    The dense per-patch signal keeps the visual tokens informative from the first step.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, PATCH_TARGET_DIM + 2)

    def loss(
        self, image_features: torch.Tensor, targets: torch.Tensor, object_weight: float = 1.0
    ) -> torch.Tensor:
        """Soft cross-entropy of colour and shape shares plus position MSE, averaged over tokens.

        Args:
            image_features: `torch.FloatTensor` of shape `(B * 144, H)` or `(B, 144, H)`.
            targets: `torch.FloatTensor` of shape `(B, 144, 12)` from `data.patch_targets`.
            object_weight: Weight of a patch fully covered by an object, relative to a background patch (1
                gives the plain mean). Objects cover ~5% of the patches, so with the plain mean the colour and
                shape terms are nearly all background, and measured at step 1250 of stage ``single`` a probe
                read the shape of object patches at chance (21%) while reading their colour at 98%.
        """
        batch, num_tokens, _ = targets.shape
        out = self.proj(image_features.reshape(batch, num_tokens, -1).float())
        weights = 1.0 + (object_weight - 1.0) * (
            1.0 - targets[..., 0]
        )  # (B, 144): background share is [..., 0]
        weights = weights / weights.mean()
        colour = -(targets[..., :7] * F.log_softmax(out[..., :7], dim=-1)).sum(-1)
        shape = -(targets[..., 7:] * F.log_softmax(out[..., 7:PATCH_TARGET_DIM], dim=-1)).sum(-1)
        side = int(math.isqrt(num_tokens))
        grid = (torch.arange(side, device=out.device, dtype=torch.float32) + 0.5) / side * 2 - 1
        rows, cols = torch.meshgrid(grid, grid, indexing="ij")
        where = torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=-1)  # (144, 2): x, y in [-1, 1]
        position = F.mse_loss(out[..., PATCH_TARGET_DIM:], where.expand(batch, -1, -1))
        return ((colour + shape) * weights).mean() + position


@torch.no_grad()
def rescale_image_tokens(
    model: LlavaForConditionalGeneration, batch: dict[str, torch.Tensor], target_norm: float
) -> tuple[float, float]:
    """Scale the projector's last linear layer so the visual tokens of `batch` have mean L2 norm `target_norm`.

    Why: measured on stage ``color_shape`` step 1750, the visual tokens entering the LLM had mean norm 40 while
    the text embeddings had norm 1. Every head that reads an image token then writes a value ~40x larger than
    the phrase's own signal into the text positions, and after RMSNorm the phrase is lost: a linear probe
    recovered the named colour at chance at the answer position. The projector output is linear in its last
    layer, so scaling its weight and bias sets the norm exactly; the architecture is unchanged.

    Returns:
        (norm before, norm after).
    """
    projector = model.model.multi_modal_projector

    def mean_norm() -> float:
        outputs = model.model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
        )
        return outputs.image_hidden_states.float().norm(dim=-1).mean().item()

    before = mean_norm()
    scale = target_norm / before
    projector.linear_2.weight.mul_(scale)
    projector.linear_2.bias.mul_(scale)
    return before, mean_norm()


class PhraseHead(torch.nn.Module):
    """Training-only probe: at the position that predicts the answer, read what the prompt names.

    Measured on stage ``color_shape`` step 1750 (after 1000 steps of the attention loss): a linear probe on
    the residual stream at that position recovered the colour named by "Locate the red object." at chance
    (13-31% over the 9 layers; chance 17%). The LLM, trained first on one-object scenes where the phrase never
    mattered, had learned to ignore the text, so no head could select the named object: the attention loss
    alone (whole model, 200 steps) stalled at 3.30 nats, the value of attending to every object equally (3.21).
    This loss predicts the named colour, shape and extreme (each with a "none" class) from the residual entering
    layer `layer`, which gives the phrase-to-answer routing a direct gradient. Never saved into the model.
    """

    def __init__(self, hidden_size: int, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.proj = torch.nn.Linear(hidden_size, sum(PROMPT_ATTRIBUTE_CLASSES))

    def loss(
        self, hidden_states: Sequence[torch.Tensor], labels: torch.Tensor, attributes: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """Summed cross-entropy of the three attributes, averaged over rows; also the all-correct accuracy.

        Args:
            hidden_states: The LLM's hidden states per layer (`output_hidden_states=True`), each `(B, L, H)`.
            labels: `(B, L)` labels; the first non-ignored one is the first answer token.
            attributes: `(B, 3)` from `data.prompt_attributes`.
        """
        hidden = hidden_states[self.layer]
        answer_start = answer_start_positions(labels)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), answer_start].float()
        picked = F.layer_norm(picked, picked.shape[-1:])  # the raw residual is large (first loss was 80 nats)
        logits = self.proj(picked).split(PROMPT_ATTRIBUTE_CLASSES, dim=-1)
        loss = sum(F.cross_entropy(part, attributes[:, i]) for i, part in enumerate(logits))
        correct = torch.stack([part.argmax(-1) == attributes[:, i] for i, part in enumerate(logits)]).all(0)
        return loss, correct.float().mean().item()


def _rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on `(b, n, heads, d)` states with `(b, n, d)` tables, as Llama attention applies it."""
    return states * cos[:, :, None] + rotate_half(states) * sin[:, :, None]


class AttentionProbe:
    """Training-only loss that teaches LLM attention heads to look at what the prompt names.

    Measured: after stage ``single`` the LLM attends sharply to the only object (it reads its colour with 94%
    accuracy), but on 2-5 objects it has no reason yet to prefer the named one, and the location error stayed at
    ~250 of 1000 bins (an arbitrary object) for 700 steps of stage ``color_shape``. This loss gives the
    phrase-to-object match a direct gradient: at the positions that predict the first `positions` answer tokens,
    each head in `heads` of each layer in `layers` should spread its attention over the visual tokens like the
    target shares (cross-entropy against normalised `data.attention_target_shares`). Rows without a target
    (all-zero shares) are skipped. Softmax runs over the visual tokens only, so a head stays free to weigh text
    against image; it only learns WHERE in the image to look. It changes nothing at inference: no parameters
    are added and the hooks only record each layer's inputs.

    One head of the middle layer was the first setting (`--attn-layers` default). Measured at stage ``all``
    step 1750 with it: that head picked the named object in 72% of grounding items, but the first location
    token pointed at it in only 34 of those 72 - the later layers read the position from elsewhere. Hence
    several layers, all heads and every location token.

    Args:
        model: The LLaVA model being trained.
        layers: Decoder layer indices (default: the middle one).
        heads: Query head indices within each layer (default: head 0; None: every head).
        positions: How many answer positions per row are supervised (4 covers a box's location tokens).
    """

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = (0,),
        positions: int = 1,
    ) -> None:
        decoder = model.model.language_model.layers
        self.layers = tuple(layers) if layers is not None else (len(decoder) // 2,)
        self.heads = tuple(range(model.config.text_config.num_attention_heads) if heads is None else heads)
        self.positions = positions
        self.attentions = [decoder[index].self_attn for index in self.layers]
        self._inputs: list[dict[str, Any]] = [{} for _ in self.layers]
        self._handles = [
            attention.register_forward_pre_hook(partial(self._record, slot), with_kwargs=True)
            for slot, attention in enumerate(self.attentions)
        ]

    def _record(
        self, slot: int, _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._inputs[slot] = {
            "hidden_states": kwargs.get("hidden_states", args[0] if args else None),
            "position_embeddings": kwargs.get("position_embeddings"),
        }

    def loss(
        self, input_ids: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, image_token_id: int
    ) -> torch.Tensor | None:
        """Mean cross-entropy over supervised (row, layer, head, position), or None when no row has a target.

        Args:
            input_ids: `(B, L)` ids of the batch (visual tokens are `image_token_id`).
            labels: `(B, L)` labels; the first non-ignored one is the first answer token.
            targets: `(B, 144)` target shares per visual token (all zeros: no target for that row).
            image_token_id: Id of the `<image>` placeholder.
        """
        rows = targets.sum(-1) > 0
        if not rows.any() or any(inputs.get("hidden_states") is None for inputs in self._inputs):
            return None
        row_labels = labels[rows]
        batch, length = row_labels.shape
        positions = answer_start_positions(row_labels)[:, None] + torch.arange(
            self.positions, device=labels.device
        )
        predicted = (positions + 1).clamp(max=length - 1)
        valid = (positions + 1 < length) & (row_labels.gather(1, predicted) != IGNORE_INDEX)  # (b, P)
        positions = positions.clamp(max=length - 1)
        wanted = targets[rows] / targets[rows].sum(-1, keepdim=True)  # (b, 144)
        image_positions = input_ids[rows] == image_token_id  # (b, L), 144 per row
        heads = torch.tensor(self.heads, device=labels.device)
        row_index = torch.arange(batch, device=labels.device)[:, None]
        losses = []
        for attention, inputs in zip(self.attentions, self._inputs, strict=True):
            hidden = inputs["hidden_states"][rows]
            cos, sin = (
                t[rows] if t.shape[0] == rows.shape[0] else t.expand(batch, -1, -1)
                for t in inputs["position_embeddings"]
            )
            head_dim = attention.head_dim
            # Project only what the loss reads: the supervised query positions and the 144 visual keys.
            query = attention.q_proj(hidden[row_index, positions]).view(batch, self.positions, -1, head_dim)
            query = _rotary(query, cos[row_index, positions], sin[row_index, positions])[:, :, heads]
            keys = attention.k_proj(hidden[image_positions]).view(batch, -1, attention.k_proj.out_features)
            keys = keys.view(batch, keys.shape[1], -1, head_dim)
            image_cos, image_sin = (t[image_positions].view(batch, -1, head_dim) for t in (cos, sin))
            keys = _rotary(keys, image_cos, image_sin)[:, :, heads // attention.num_key_value_groups]
            logits = torch.einsum("bphd,bnhd->bphn", query.float(), keys.float()) * attention.scaling
            losses.append(-(wanted[:, None, None] * F.log_softmax(logits, dim=-1)).sum(-1))  # (b, P, h)
        per_position = torch.stack(losses).mean(dim=(0, 3))  # (b, P)
        return per_position[valid].mean()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def autocast_for(device: torch.device, precision: str = "auto") -> Any:
    """The autocast context of `--precision` on `device` (a no-op for fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def training_step(
    model: LlavaForConditionalGeneration,
    batch: dict[str, torch.Tensor],
    args: argparse.Namespace,
    loc_offset: int,
    patch_head: PatchHead | None = None,
    attention_probe: AttentionProbe | None = None,
    phrase_head: PhraseHead | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward one collated batch (already on the model's device) and return the loss."""
    with autocast_for(batch["input_ids"].device, args.precision):
        outputs = model.model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids_from_mask(batch["attention_mask"]),
            use_cache=False,
            output_hidden_states=phrase_head is not None,
        )
        loss, stats = answer_loss(
            outputs.last_hidden_state,
            batch["labels"],
            model.lm_head,
            loc_offset,
            args.loc_sigma,
            args.loc_soft_weight,
            args.example_weighting,
        )
    num_images = batch["pixel_values"].shape[0]
    stats["answer_loss"] = loss.item()
    if patch_head is not None and args.aux_weight > 0:
        aux = patch_head.loss(outputs.image_hidden_states, batch["patch_targets"], args.aux_object_weight)
        stats["aux_loss"] = aux.item()
        loss = loss + args.aux_weight * aux
    if phrase_head is not None:
        phrase, phrase_acc = phrase_head.loss(
            outputs.hidden_states, batch["labels"], batch["prompt_attributes"]
        )
        stats["phrase_loss"], stats["phrase_acc"] = phrase.item(), phrase_acc
        loss = loss + args.phrase_weight * phrase
    if attention_probe is not None and args.attn_weight > 0:
        with autocast_for(batch["input_ids"].device, args.precision):
            targets = batch["attention_targets"] if args.attn_questions else batch["target_patches"]
            attn = attention_probe.loss(
                batch["input_ids"], batch["labels"], targets, model.config.image_token_id
            )
        if attn is not None:
            stats["attn_loss"] = attn.item()
            loss = loss + args.attn_weight * attn
    stats["image_token_spread"] = image_token_spread(outputs.image_hidden_states, num_images)
    return loss, stats


@torch.no_grad()
def image_token_spread(image_features: torch.Tensor | None, num_images: int) -> float:
    """How different the visual tokens of one image are: std over tokens / RMS, averaged over images.

    ~0.4 at initialisation; near 0 means the vision pathway collapsed to one constant vector, after which the
    LLM can only learn answer priors (see `PatchHead`).

    Args:
        image_features: `torch.FloatTensor` of shape `(num_images * 144, H)` (as LLaVA returns them).
        num_images: Images in the batch.
    """
    if image_features is None:
        return float("nan")
    features = image_features.float().reshape(num_images, -1, image_features.shape[-1])
    rms = features.pow(2).mean(dim=(1, 2)).sqrt().clamp(min=1e-12)
    return (features.std(dim=1).mean(dim=-1) / rms).mean().item()


@torch.no_grad()
def generate_answers(
    model: LlavaForConditionalGeneration,
    processor: ProcessorMixin,
    examples: Sequence[Example],
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy answers (special tokens kept, so location tokens survive) through the real processor and chat
    template, as the service would build the inputs; one padded batch."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.prompt}]}],
            add_generation_prompt=True,
        )
        for ex in examples
    ]
    images = [scenes.render(ex.scene) for ex in examples]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(model.device)
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=False)


@torch.no_grad()
def evaluate(
    model: LlavaForConditionalGeneration,
    processor: ProcessorMixin,
    examples: list[Example],
    batch_size: int = 32,
) -> dict[str, float]:
    """Greedy generation through the real processor; Acc@0.5 for grounding, exact match for questions.

    Returns:
        {"ground_acc", "vqa_acc", "<kind>_acc" per item kind, "ground_n", "vqa_n"}.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        with autocast_for(device):
            answers = generate_answers(model, processor, chunk)
        for ex, answer in zip(chunk, answers, strict=True):
            hits[ex.kind].append(_is_correct(ex, answer, processor))
    if was_training:
        model.train()
    metrics: dict[str, float] = {}
    for family in ("ground", "vqa"):
        family_hits = [h for kind, values in hits.items() if kind.startswith(family) for h in values]
        if family_hits:
            metrics[f"{family}_acc"] = sum(family_hits) / len(family_hits)
            metrics[f"{family}_n"] = len(family_hits)
    for kind, values in sorted(hits.items()):
        metrics[f"{kind}_acc"] = sum(values) / len(values)
    return metrics


def predicted_box(answer: str, size: int) -> tuple[float, float, float, float] | None:
    """The first box of a built-in-model answer, in pixels of its square scene of side `size` (None: no box)."""
    boxes = parse_boxes(answer, "loc_tokens", (size, size))
    if not boxes:
        return None
    return to_pixels(boxes[0].xyxy_norm, resize_frame((size, size)), (size, size))


def _is_correct(example: Example, answer: str, processor: ProcessorMixin) -> bool:
    if example.box is not None:
        predicted = predicted_box(answer, example.scene.size)
        return predicted is not None and scenes.grounding_correct(predicted, example.box)
    text = answer
    for token in (processor.tokenizer.eos_token, processor.tokenizer.pad_token):
        text = text.replace(token, "")
    return scenes.vqa_correct(text, example.answer)


def _load_model_dir(path: Path) -> Path:
    return path / CHECKPOINT if (path / CHECKPOINT / "config.json").exists() else path


def _param_groups(
    model: torch.nn.Module, lr: float, weight_decay: float, vision_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW groups: (vision or language) x (decayed matrices or undecayed norms/biases/embeddings)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_vision = "vision_tower" in name or "multi_modal_projector" in name
        decays = not (param.ndim < 2 or "embed" in name or "norm" in name)
        groups[is_vision, decays].append(param)
    return [
        {
            "params": params,
            "lr": lr * (vision_lr_scale if is_vision else 1.0),
            "weight_decay": weight_decay if decays else 0.0,
        }
        for (is_vision, decays), params in sorted(groups.items())
    ]


def _int_list(text: str) -> list[int]:
    """Parse "4,5,6" (argparse type of the AttentionProbe flags)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def _kind_weights(text: str) -> dict[str, float]:
    """Parse "vqa/count=2,ground/extremal=1.5" for ``--kind-weights`` (kinds of `scenes`, weights > 0)."""
    known = {f"ground/{k}" for k in scenes.PHRASE_KINDS} | {f"vqa/{k}" for k in scenes.QUESTION_KINDS}
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        if not sep or kind.strip() not in known:
            raise argparse.ArgumentTypeError(
                f"expected KIND=WEIGHT with KIND in {sorted(known)}, got {part!r}"
            )
        try:
            weight = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {kind!r} is not a number: {value!r}") from None
        if not weight > 0:
            raise argparse.ArgumentTypeError(f"weight of {kind!r} must be > 0, got {weight}")
        weights[kind.strip()] = weight
    return weights


def _heads_list(text: str) -> list[int] | None:
    """Parse "0,2" or "all" (None: every head) for ``--attn-heads``."""
    return None if text.strip() == "all" else _int_list(text)


def _lr_lambda(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _save(
    out: Path,
    model: LlavaForConditionalGeneration,
    processor: ProcessorMixin,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    args: argparse.Namespace,
    patch_head: torch.nn.Module,
    phrase_head: torch.nn.Module | None = None,
) -> None:
    """Write checkpoint/ and trainer_state.pt through temporary names, so a kill never leaves half a file."""
    tmp_dir = out / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir)
    processor.save_pretrained(tmp_dir)
    state = {
        "step": step,
        "stage": args.stage,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "optimizer": optimizer.state_dict(),
        "patch_head": patch_head.state_dict(),
        "phrase_head": None if phrase_head is None else phrase_head.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python_rng": random.getstate(),
    }
    torch.save(state, out / f"{STATE_FILE}.tmp")
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    os.replace(tmp_dir, out / CHECKPOINT)
    os.replace(out / f"{STATE_FILE}.tmp", out / STATE_FILE)


def _append_metrics(out: Path, record: dict[str, Any]) -> None:
    with (out / METRICS_FILE).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) one stage; returns the last evaluation record."""
    torch.set_num_threads(args.threads)
    device = _device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    state: dict[str, Any] | None = None
    if args.resume:
        if not (args.out / STATE_FILE).exists():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {args.out}")
        state = torch.load(args.out / STATE_FILE, map_location="cpu", weights_only=False)
        if state["stage"] != args.stage:
            raise ValueError(f"--resume: {args.out} holds stage {state['stage']!r}, not {args.stage!r}")
        source: Path | None = args.out / CHECKPOINT
    else:
        source = _load_model_dir(args.init) if args.init else None
    if source is None:
        model, processor = build_builtin(None, TINY_OVERRIDES if args.tiny else None, seed=args.seed)
    else:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    model.to(device).train()
    loc_offset = int(processor.tokenizer.convert_tokens_to_ids("<loc_0>"))

    patch_head = PatchHead(model.config.text_config.hidden_size).to(device)
    attention_probe = None
    if args.attn_weight > 0:
        attention_probe = AttentionProbe(model, args.attn_layers, args.attn_heads, args.attn_positions)
    phrase_head = None
    if args.phrase_weight > 0:
        layer = (
            model.config.text_config.num_hidden_layers // 2
            if args.phrase_layer is None
            else args.phrase_layer
        )
        phrase_head = PhraseHead(model.config.text_config.hidden_size, layer).to(device)
    param_groups = _param_groups(model, args.lr, args.weight_decay, args.vision_lr_scale)
    param_groups.append({"params": list(patch_head.parameters()), "lr": args.lr, "weight_decay": 0.0})
    if phrase_head is not None:
        param_groups.append({"params": list(phrase_head.parameters()), "lr": args.lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(
        param_groups,
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
        fused=False,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args.warmup, args.steps))
    step = 0
    if state is not None:
        patch_head.load_state_dict(state["patch_head"])
        if (phrase_head is None) != (state.get("phrase_head") is None):
            raise ValueError("--resume: --phrase-weight must stay on (or off) as it was in this run")
        if phrase_head is not None:
            phrase_head.load_state_dict(state["phrase_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        logger.info("resumed %s at step %d", args.out, step)

    if args.image_token_norm is not None and state is None:
        probe_batch = SceneBatches(processor.tokenizer, args.stage, 16, seed=args.seed).batch(10**6)
        before, after = rescale_image_tokens(
            model, {k: v.to(device) for k, v in probe_batch.items()}, args.image_token_norm
        )
        logger.info("visual-token mean norm %.2f -> %.2f", before, after)
    num_workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 1)
    dataset = SceneBatches(
        processor.tokenizer,
        args.stage,
        args.batch_size,
        seed=args.seed,
        start_batch=step,
        grounding_fraction=args.grounding_fraction,
        kind_weights=args.kind_weights,
    )
    batches = iter(make_loader(dataset, num_workers))
    eval_sets: dict[str, list[Example]] = {}
    if args.eval_items:
        if args.stage != "all":  # the "all" stage's own distribution is the official set
            eval_sets["stage"] = stage_eval_examples(args.stage, args.eval_items)
        eval_sets["all"] = official_eval_examples(max(1, args.eval_items // 2))

    def run_eval() -> dict[str, Any]:
        started = time.monotonic()
        record: dict[str, Any] = {"type": "eval", "step": step, "stage": args.stage}
        for name, examples in eval_sets.items():
            for key, value in evaluate(model, processor, examples, args.eval_batch_size).items():
                record[f"{name}/{key}"] = value
        record["eval_s"] = round(time.monotonic() - started, 1)
        _append_metrics(args.out, record)
        logger.info("eval %s", json.dumps(record))
        return record

    last_eval: dict[str, Any] = {}
    window: dict[str, list[float]] = defaultdict(list)
    window_start, data_wait = time.monotonic(), 0.0
    progress = tqdm(
        total=args.steps,
        initial=step,
        desc=args.stage,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30,
    )
    last_step = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    while step < last_step:
        fetch_start = time.monotonic()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        data_wait += time.monotonic() - fetch_start
        loss, stats = training_step(model, batch, args, loc_offset, patch_head, attention_probe, phrase_head)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}")
        window["loss"].append(loss.item())
        window["grad_norm"].append(float(grad_norm))
        for key, value in stats.items():
            window[key].append(value)
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % args.log_every == 0 or step == last_step:
            elapsed = time.monotonic() - window_start
            record = {"type": "train", "step": step, "stage": args.stage, "lr": scheduler.get_last_lr()[0]}
            record.update({k: sum(v) / len(v) for k, v in window.items()})
            record["steps_per_s"] = len(window["loss"]) / elapsed
            record["data_wait_frac"] = data_wait / elapsed
            _append_metrics(args.out, record)
            window.clear()
            window_start, data_wait = time.monotonic(), 0.0
        if step % args.eval_every == 0 or step == last_step:
            if eval_sets:
                last_eval = run_eval()
            _save(args.out, model, processor, optimizer, scheduler, step, args, patch_head, phrase_head)
            window_start = time.monotonic()
    progress.close()
    return last_eval


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(parse_args(argv))


if __name__ == "__main__":
    main()

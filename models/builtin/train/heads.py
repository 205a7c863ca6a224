"""Training-only probes and auxiliary losses: what kept the tiny model's vision, phrase reading and attention on
track (each with the measurement that made it necessary). None of them adds a parameter to the saved model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import rotate_half

from models.builtin.data import IGNORE_INDEX, PATCH_TARGET_DIM, PROMPT_ATTRIBUTE_CLASSES
from models.builtin.train.losses import answer_start_positions


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


class AttentionTargetLoss:
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


__all__ = ["AttentionTargetLoss", "PatchHead", "PhraseHead", "image_token_spread", "rescale_image_tokens"]

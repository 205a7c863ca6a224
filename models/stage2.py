"""LLM-side token dropping (Nüwa stage 2, FastV) for padded batches, with a KV cache that stays consistent.

Why a controller and not a one-line hook: after a drop, every later decoder layer sees a SHORTER sequence, each
sample kept a different number of tokens, and the model's own attention mask and rotary tables still describe the
long sequence. So from the drop layer on this controller owns the layout: it gathers the kept hidden states,
re-pads them on the left, and hands those layers their own causal+padding mask and the rotary embeddings of the
kept tokens' ORIGINAL positions. During cached decoding the layers after a drop have a shorter KV cache than the
layers before it; the controller extends each segment's own padding mask by the new tokens, so a padded batch
decodes exactly like each sample alone.

Everything happens in forward pre-hooks registered on the decoder layers of one model instance; with no active
run they return immediately, so the model behaves as stock transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from models.attention import QueryRowProbe, attach_probe
from models.pruning import select_topk


@dataclass(frozen=True)
class DropPlan:
    """What one sample does inside the LLM.

    Attributes:
        layer: decoder layer index before which tokens are dropped (scores come from layer - 1); None = no drop.
        keep: visual tokens kept from `layer` on.
        scoring: "last_token_mean" (last prompt token, mean over heads), "last3_max" (last 3 prompt tokens, max over
            heads, summed), or "text_cosine" (cosine between each visual token and the mean prompt text state).
    """

    layer: int | None = None
    keep: int = 0
    scoring: str = "last_token_mean"


@dataclass
class _Layout:
    """Which stage-1 sequence positions each row currently holds (left-padded)."""

    index: torch.Tensor  # (B, L) int64 into the stage-1 sequence; pads point at 0
    valid: torch.Tensor  # (B, L) bool


@dataclass
class _Run:
    plans: list[DropPlan]
    visual: torch.Tensor  # (B, L1) bool, visual tokens of the stage-1 sequence
    valid: torch.Tensor  # (B, L1) bool, non-pad tokens of the stage-1 sequence
    trailing: int  # tokens after the prompt (generated tokens re-fed without a cache)
    drop_layers: set[int]
    layout: _Layout | None = None  # None = still the stage-1 layout
    segment_layout: dict[int, _Layout] = field(default_factory=dict)  # first layer of a segment -> its layout
    probes: dict[int, QueryRowProbe] = field(default_factory=dict)  # scoring layer -> probe
    visual_counts: list[list[int]] = field(default_factory=list)  # per layer, per sample
    decoding: bool = False


class LayerDropController:
    """Owns the LLM-side drop for one model instance (see module docstring)."""

    def __init__(self, decoder_layers: nn.ModuleList) -> None:
        self._layers = decoder_layers
        self._run: _Run | None = None
        self._handles = [
            layer.register_forward_pre_hook(self._make_hook(index), with_kwargs=True)
            for index, layer in enumerate(decoder_layers)
        ]

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def begin(
        self, plans: list[DropPlan], visual: torch.Tensor, valid: torch.Tensor, trailing: int = 0
    ) -> None:
        """Arm a prefill over the stage-1 sequence.

        Args:
            plans: one `DropPlan` per sample.
            visual: `torch.BoolTensor` of shape `(batch, seq_len)`, True at visual tokens.
            valid: `torch.BoolTensor` of shape `(batch, seq_len)`, False at left padding.
            trailing: tokens at the end that follow the prompt (the scoring query is the last prompt token).
        """
        drop_layers = {plan.layer for plan in plans if plan.layer is not None}
        for layer in drop_layers:
            if not 1 <= layer < self.num_layers:
                raise ValueError(f"drop layer must be in [1, {self.num_layers - 1}], got {layer}")
        self._run = _Run(plans=plans, visual=visual, valid=valid, trailing=trailing, drop_layers=drop_layers)
        for layer in drop_layers:
            probe = QueryRowProbe()
            self._run.probes[layer - 1] = probe
            attach_probe(self._layers[layer - 1].self_attn, probe)

    def end_prefill(self) -> None:
        """Switch to cached decoding: detach probes, keep the per-segment padding masks."""
        run = self._require_run()
        for layer in run.probes:
            attach_probe(self._layers[layer].self_attn, None)
        run.probes.clear()
        run.decoding = True

    def finish(self) -> None:
        """End the run: hooks become no-ops again."""
        if self._run is not None:
            for layer in self._run.probes:
                attach_probe(self._layers[layer].self_attn, None)
        self._run = None

    # ---- results ---------------------------------------------------------------------------------------------
    @property
    def visual_counts(self) -> list[list[int]]:
        """Visual tokens seen by each layer (outer) for each sample (inner), from the last prefill."""
        return self._require_run().visual_counts

    def kept_visual(self) -> list[torch.Tensor]:
        """Per sample, the stage-1 sequence positions of the visual tokens that reached the last layer."""
        run = self._require_run()
        layout = run.layout
        kept = []
        for b in range(run.visual.shape[0]):
            if layout is None:
                positions = torch.nonzero(run.visual[b] & run.valid[b]).flatten()
            else:
                positions = layout.index[b][layout.valid[b]]
                positions = positions[run.visual[b][positions]]
            kept.append(positions.cpu())
        return kept

    def final_layout(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(index, valid) of the last layer's rows into the stage-1 sequence, or None if nothing was dropped."""
        run = self._require_run()
        return None if run.layout is None else (run.layout.index, run.layout.valid)

    # ---- the hook --------------------------------------------------------------------------------------------
    def _require_run(self) -> _Run:
        if self._run is None:
            raise RuntimeError("no active run: call begin() first")
        return self._run

    def _make_hook(self, layer_index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            run = self._run
            if run is None:
                return None
            if run.decoding:
                return self._decode_hook(layer_index, args, kwargs)
            return self._prefill_hook(layer_index, args, kwargs)

        return hook

    def _prefill_hook(self, layer_index: int, args: tuple, kwargs: dict[str, Any]):
        run = self._require_run()
        hidden = args[0] if args else kwargs["hidden_states"]
        if layer_index in run.drop_layers:
            hidden = self._drop(layer_index, hidden)
            run.segment_layout[layer_index] = run.layout
        if run.layout is not None:
            kwargs = self._substitute_prefill(run.layout, kwargs)
        next_layer = layer_index + 1
        if next_layer in run.drop_layers:
            self._arm_probe(layer_index, next_layer)
        run.visual_counts.append(self._count_visual())
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _count_visual(self) -> list[int]:
        run = self._require_run()
        if run.layout is None:
            return (run.visual & run.valid).sum(dim=1).tolist()
        gathered = run.visual.gather(1, run.layout.index) & run.layout.valid
        return gathered.sum(dim=1).tolist()

    def _current(self) -> _Layout:
        run = self._require_run()
        if run.layout is not None:
            return run.layout
        batch, length = run.valid.shape
        index = torch.arange(length, device=run.valid.device).expand(batch, length)
        return _Layout(index=index, valid=run.valid)

    def _arm_probe(self, layer_index: int, drop_layer: int) -> None:
        run = self._require_run()
        layout = self._current()
        length = layout.index.shape[1]
        last_prompt = length - 1 - run.trailing
        probe = run.probes[layer_index]
        probe.query_index = {}
        for b, plan in enumerate(run.plans):
            if plan.layer != drop_layer or plan.scoring == "text_cosine":
                continue
            if plan.scoring == "last3_max":
                probe.query_index[b] = [p for p in range(last_prompt - 2, last_prompt + 1) if p >= 0]
            else:
                probe.query_index[b] = [last_prompt]
        probe.key_valid = layout.valid
        probe.rows = {}
        probe.armed = bool(probe.query_index)

    def _scores(
        self, layer_index: int, b: int, plan: DropPlan, hidden: torch.Tensor, layout: _Layout
    ) -> torch.Tensor:
        """Score every row of the current layout for sample b (higher = keep)."""
        run = self._require_run()
        if plan.scoring == "text_cosine":
            length = layout.index.shape[1]
            rows_visual = run.visual[b][layout.index[b]] & layout.valid[b]
            prompt_rows = torch.arange(length, device=hidden.device) < length - run.trailing
            text_rows = layout.valid[b] & ~rows_visual & prompt_rows
            states = hidden[b].float()
            text_mean = states[text_rows].mean(dim=0, keepdim=True)
            return torch.nn.functional.cosine_similarity(states, text_mean, dim=-1)
        rows = run.probes[layer_index - 1].rows.get(b)
        if rows is None:
            raise RuntimeError(f"no attention row captured at layer {layer_index - 1} for sample {b}")
        if plan.scoring == "last3_max":
            return rows.max(dim=0).values.sum(dim=0)
        return rows.mean(dim=0)[0]

    def _drop(self, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        run = self._require_run()
        layout = self._current()
        local_rows: list[torch.Tensor] = []
        for b, plan in enumerate(run.plans):
            valid_rows = torch.nonzero(layout.valid[b]).flatten()
            if plan.layer != layer_index:
                local_rows.append(valid_rows)
                continue
            is_visual = run.visual[b][layout.index[b][valid_rows]]
            visual_rows = valid_rows[is_visual]
            scores = self._scores(layer_index, b, plan, hidden, layout)[visual_rows]
            keep = min(plan.keep, visual_rows.numel())
            kept_visual = visual_rows[select_topk(scores, keep)]
            kept = torch.cat([valid_rows[~is_visual], kept_visual]).sort().values
            local_rows.append(kept)
        new_length = max(rows.numel() for rows in local_rows)
        batch = hidden.shape[0]
        device = hidden.device
        local = torch.zeros(batch, new_length, dtype=torch.long, device=device)
        valid = torch.zeros(batch, new_length, dtype=torch.bool, device=device)
        for b, rows in enumerate(local_rows):
            local[b, new_length - rows.numel() :] = rows
            valid[b, new_length - rows.numel() :] = True
        new_hidden = hidden.gather(1, local[..., None].expand(-1, -1, hidden.shape[-1]))
        index = layout.index.gather(1, local).masked_fill(~valid, 0)
        run.layout = _Layout(index=index, valid=valid)
        return new_hidden

    def _substitute_prefill(self, layout: _Layout, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        length = layout.index.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=layout.valid.device).tril()
        mask = causal[None] & layout.valid[:, None, :]
        mask = mask | torch.eye(length, dtype=torch.bool, device=mask.device)[None]  # pad rows: no NaN
        kwargs["attention_mask"] = mask[:, None]
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (_gather_rows(cos, layout.index), _gather_rows(sin, layout.index))
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _gather_rows(kwargs["position_ids"], layout.index)
        return kwargs

    def decode_key_valid(self, layer_index: int) -> torch.Tensor | None:
        """During cached decoding: the `(B, L)` padding mask of the segment whose KV cache `layer_index` holds
        (the layout the drop before it produced), or None when no drop precedes the layer (or nothing runs)."""
        run = self._run
        if run is None or not run.decoding:
            return None
        segment_start = max((layer for layer in run.segment_layout if layer <= layer_index), default=None)
        return None if segment_start is None else run.segment_layout[segment_start].valid

    def _decode_hook(self, layer_index: int, args: tuple, kwargs: dict[str, Any]):
        segment_valid = self.decode_key_valid(layer_index)
        if segment_valid is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        query_length = hidden.shape[1]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length(layer_index) if cache is not None else 0
        new_tokens = past + query_length - segment_valid.shape[1]
        batch = segment_valid.shape[0]
        extension = torch.ones(batch, new_tokens, dtype=torch.bool, device=segment_valid.device)
        key_valid = torch.cat([segment_valid, extension], dim=1)  # (B, Lk)
        key_positions = torch.arange(key_valid.shape[1], device=key_valid.device)
        query_positions = key_positions[-query_length:]
        mask = (key_positions[None, :] <= query_positions[:, None])[None] & key_valid[:, None, :]
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask[:, None]
        return args, kwargs


def _gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along the sequence axis: values (B or 1, L, ...) or (B, L) -> (B, L', ...)."""
    batch = index.shape[0]
    if values.shape[0] != batch:
        values = values.expand(batch, *values.shape[1:])
    if values.dim() == 2:
        return values.gather(1, index)
    expanded = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return values.gather(1, expanded)


__all__ = ["DropPlan", "LayerDropController"]

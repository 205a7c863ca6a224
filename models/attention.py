"""SDPA everywhere, plus one attention row (or column sum) for the few modules that pruning needs to score.

Nüwa scores tokens with attention weights: CLS->patch attention in the vision tower (LLaVA), attention received in
the last vision block (Qwen2.5-VL), and the last prompt token's attention in LLM layer K-1 (stage 2). Switching a
model to eager attention to get them would cost a full L x L matrix in every layer. Instead one attention function,
registered under the name `nuwa_sdpa`, runs plain SDPA for every module and, only for modules that carry a probe
(an attribute set on that module INSTANCE), also computes the single row or column sum that is needed from the same
query/key tensors. Registering a new name touches no existing model: only models switched to `nuwa_sdpa` (by
`enable_probes`) use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION_NAME = "nuwa_sdpa"
PROBE_ATTRIBUTE = "_nuwa_probe"


class AttentionProbe(Protocol):
    """Something that wants to see one module's query/key tensors during a forward."""

    def observe(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, scaling: float
    ) -> None: ...


def _nuwa_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    probe: AttentionProbe | None = getattr(module, PROBE_ATTRIBUTE, None)
    if probe is not None:
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        probe.observe(module, query, key, float(scaling))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _nuwa_sdpa)
# The mask builder is looked up under the same name as the attention function.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable_probes(model: torch.nn.Module) -> None:
    """Route every attention module of this model instance through `nuwa_sdpa` (numerically plain SDPA)."""
    config = model.config
    sub_configs = [
        name for name in ("text_config", "vision_config") if getattr(config, name, None) is not None
    ]
    if sub_configs:
        model.set_attn_implementation(dict.fromkeys(sub_configs, ATTENTION_NAME))
    else:
        model.set_attn_implementation(ATTENTION_NAME)


def attach_probe(module: torch.nn.Module, probe: AttentionProbe | None) -> None:
    """Attach (or with None, detach) a probe on one attention module instance."""
    if probe is None:
        if hasattr(module, PROBE_ATTRIBUTE):
            delattr(module, PROBE_ATTRIBUTE)
    else:
        setattr(module, PROBE_ATTRIBUTE, probe)


@dataclass
class ClsRowProbe:
    """CLS->patch attention of one CLIP-style layer, summed over heads (LLaVA's Nüwa salience).

    Records, per image, softmax(q_cls k^T * scale) over all keys, summed over heads, CLS column dropped, plus the
    mean key L2 norm of every patch (the paper's optional salience factor). Only the CLS row is computed.
    """

    salience: torch.Tensor | None = None  # (B, N) float32
    key_norm: torch.Tensor | None = None  # (B, N) float32

    def observe(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, scaling: float
    ) -> None:
        # query/key: (B, H, 1 + N, d)
        cls_query = query[:, :, :1].float()
        logits = torch.matmul(cls_query, key.float().transpose(-1, -2)) * scaling  # (B, H, 1, 1 + N)
        row = logits.softmax(dim=-1)[:, :, 0]
        self.salience = row.sum(dim=1)[:, 1:]
        self.key_norm = key.float().norm(dim=-1).mean(dim=1)[:, 1:]


@dataclass
class ColumnSumProbe:
    """Attention received by every token of one full-attention vision block (Qwen2.5-VL's Nüwa salience).

    The block runs once per image chunk (SDPA path) or once for the packed sequence; each call's column sums (sum
    over queries of the softmax, mean over heads) are appended in call order, so concatenating them gives one value
    per patch in the block's (window-permuted) order.
    """

    chunk: int = 1024
    columns: list[torch.Tensor] = field(default_factory=list)
    key_norms: list[torch.Tensor] = field(default_factory=list)

    def observe(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, scaling: float
    ) -> None:
        # query/key: (1, H, L, d) for one image
        q = query[0].float()
        k = key[0].float()
        total = torch.zeros(k.shape[1], dtype=torch.float32, device=k.device)
        for start in range(0, q.shape[1], self.chunk):
            probs = (torch.matmul(q[:, start : start + self.chunk], k.transpose(-1, -2)) * scaling).softmax(
                -1
            )
            total += probs.sum(dim=1).mean(dim=0)
        self.columns.append(total)
        self.key_norms.append(k.norm(dim=-1).mean(dim=0))


@dataclass
class QueryRowProbe:
    """Attention that chosen query rows pay to all keys in one LLM layer, during prefill only (stage 2 / FastV).

    `rows[b]` receives a (H, Q, Lk) float32 tensor for each sample b listed in `query_index` (absolute query
    positions inside the padded sequence); `key_valid[b]` (bool, Lk) masks padding. Causality is applied here:
    a query never sees keys after itself. Decode steps (one query, or a call when `armed` is False) are ignored.
    """

    query_index: dict[int, list[int]] = field(default_factory=dict)
    key_valid: torch.Tensor | None = None
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    armed: bool = False

    def observe(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, scaling: float
    ) -> None:
        if not self.armed or query.shape[2] == 1:
            return
        num_heads, num_kv_heads = query.shape[1], key.shape[1]
        for sample, positions in self.query_index.items():
            q = query[sample, :, positions].float()  # (H, Q, d)
            k = key[sample].float()  # (Hk, Lk, d)
            if num_kv_heads != num_heads:
                k = k.repeat_interleave(num_heads // num_kv_heads, dim=0)
            logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (H, Q, Lk)
            key_positions = torch.arange(k.shape[1], device=k.device)
            allowed = key_positions[None, :] <= torch.tensor(positions, device=k.device)[:, None]
            if self.key_valid is not None:
                allowed = allowed & self.key_valid[sample][None, :].to(k.device)
            logits = logits.masked_fill(~allowed[None], float("-inf"))
            self.rows[sample] = logits.softmax(dim=-1)
        self.armed = False


__all__ = [
    "ATTENTION_NAME",
    "AttentionProbe",
    "ClsRowProbe",
    "ColumnSumProbe",
    "QueryRowProbe",
    "attach_probe",
    "enable_probes",
]

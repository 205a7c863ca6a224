"""One attention row (or column sum) for the few attention modules that pruning needs to score; every other
module keeps the model's configured attention implementation.

Nüwa scores tokens with attention weights: CLS->patch attention in the vision tower (LLaVA), attention received in
the last full-attention vision block (Qwen2.5-VL), and the last prompt token's attention in LLM layer K-1
(stage 2). Switching a model to eager attention to get them would cost a full L x L matrix in every layer, and
switching it to any other single function would take the configured kernel (varlen flash attention for Qwen's
windowed blocks, SDPA, ...) away from every block. Instead only the probed module INSTANCE is rerouted, and only
while its probe is attached:

- transformers attention modules pick their function at every call from `self.config._attn_implementation`
  (`ALL_ATTENTION_FUNCTIONS.get_interface(...)`), and all modules of a tower share one config object;
- `attach_probe` gives that one module a shallow copy of its config whose implementation is
  `nuwa_probe+<configured>` (e.g. `nuwa_probe+sdpa`, `nuwa_probe+flash_attention_2`: a name that keeps "flash"
  keeps the module on its varlen code path), registered to `_probe_attention`;
- `_probe_attention` shows the query/key tensors to the probe, then calls the ORIGINAL configured function for
  the output, so the module's output is exactly what it would have been without a probe;
- `attach_probe(module, None)` puts the shared config back.

`enable_probes(model)` only registers the probe names for the implementations the model is configured with;
it no longer changes anything in the model. `nuwa_sdpa` (the old model-wide switch) stays registered as the
probe function over SDPA for code that still names it.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from models.pruning import attention_column_sum

ATTENTION_NAME = "nuwa_sdpa"
PROBE_PREFIX = "nuwa_probe+"
PROBE_ATTRIBUTE = "_nuwa_probe"
SHARED_CONFIG_ATTRIBUTE = "_nuwa_shared_config"


class AttentionProbe(Protocol):
    """Something that wants to see one module's query/key tensors during a forward."""

    def observe(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, scaling: float
    ) -> None: ...


def probe_implementation_name(configured: str | None) -> str:
    """The attention implementation name a probed module runs under, for the model's configured one."""
    return PROBE_PREFIX + (configured or "sdpa")


def configured_implementation(module: torch.nn.Module) -> str:
    """The implementation the module runs when no probe is attached (read from the shared config at call time)."""
    config = getattr(module, SHARED_CONFIG_ATTRIBUTE, None) or getattr(module, "config", None)
    name = getattr(config, "_attn_implementation", None) or "sdpa"
    if name == ATTENTION_NAME:  # the old model-wide switch: probe function over SDPA
        return "sdpa"
    return name[len(PROBE_PREFIX) :] if name.startswith(PROBE_PREFIX) else name


def _original_function(module: torch.nn.Module, name: str) -> Callable[..., Any]:
    """The attention function transformers itself would call for `module` under implementation `name`."""
    if name == "eager":  # each modeling file has its own eager function (GQA repeat, dropout, ...)
        return getattr(
            sys.modules[type(module).__module__], "eager_attention_forward", sdpa_attention_forward
        )
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, sdpa_attention_forward)


def _packed_sequences(
    query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(query, key) per sequence: packed varlen calls (flash: batch 1 + `cu_seq_lens_*`) are split into their
    sequences, so a probe sees one image per call whatever kernel the model is configured with."""
    bounds_q, bounds_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if bounds_q is None or bounds_k is None or query.shape[0] != 1:
        yield query, key
        return
    starts_q, starts_k = bounds_q.tolist(), bounds_k.tolist()
    for (q0, q1), (k0, k1) in zip(
        zip(starts_q[:-1], starts_q[1:], strict=True),
        zip(starts_k[:-1], starts_k[1:], strict=True),
        strict=True,
    ):
        yield query[:, :, q0:q1], key[:, :, k0:k1]


def _probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Show q/k to the module's probe, then run the configured attention function for the output."""
    probe: AttentionProbe | None = getattr(module, PROBE_ATTRIBUTE, None)
    if probe is not None:
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        for sequence_query, sequence_key in _packed_sequences(query, key, kwargs):
            probe.observe(module, sequence_query, sequence_key, float(scaling))
    function = _original_function(module, configured_implementation(module))
    return function(module, query, key, value, attention_mask, **kwargs)


def _register(name: str) -> None:
    """Register the probe function (and the configured mask builder) under `name` once."""
    if name in ALL_ATTENTION_FUNCTIONS:
        return
    AttentionInterface.register(name, _probe_attention)
    configured = name[len(PROBE_PREFIX) :] if name.startswith(PROBE_PREFIX) else "sdpa"
    masks = AttentionMaskInterface._global_mapping
    AttentionMaskInterface.register(name, masks.get(configured, sdpa_mask))


_register(ATTENTION_NAME)


def enable_probes(model: torch.nn.Module) -> None:
    """Make probes attachable on this model: register the probe names for its configured implementations.

    Nothing in the model changes: every attention module keeps its configured implementation; only a module
    that carries a probe (`attach_probe`) is rerouted, and only while the probe is attached.
    """
    for module in model.modules():
        config = getattr(module, "config", None)
        implementation = getattr(config, "_attn_implementation", None)
        if isinstance(implementation, str):
            _register(probe_implementation_name(configured_implementation(module)))


def attach_probe(module: torch.nn.Module, probe: AttentionProbe | None) -> None:
    """Attach (or with None, detach) a probe on one attention module instance.

    Attaching gives this module (only) a copy of its config naming `nuwa_probe+<configured>`; detaching puts the
    shared config back, so the module is exactly as transformers built it again.
    """
    if probe is None:
        shared = module.__dict__.pop(SHARED_CONFIG_ATTRIBUTE, None)
        if shared is not None:
            module.config = shared
        module.__dict__.pop(PROBE_ATTRIBUTE, None)
        return
    if SHARED_CONFIG_ATTRIBUTE not in module.__dict__:
        shared = getattr(module, "config", None)
        if shared is None or not hasattr(shared, "_attn_implementation"):
            raise TypeError(
                f"{type(module).__name__} has no transformers config to route its attention through"
            )
        name = probe_implementation_name(shared._attn_implementation)
        _register(name)
        routed = copy.copy(shared)
        routed._attn_implementation_internal = name  # this copy only; the shared config is untouched
        module.__dict__[SHARED_CONFIG_ATTRIBUTE] = shared
        module.config = routed
    module.__dict__[PROBE_ATTRIBUTE] = probe


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

    The block runs once per image (SDPA path; the packed varlen call is split per image by `_probe_attention`);
    each call's column sums (sum over queries of the softmax, mean over heads) are appended in call order, so
    concatenating them gives one value per patch in the block's (window-permuted) order.

    Memory: heads one at a time and `chunk` queries at a time (`models.pruning.attention_column_sum`), so the
    extra memory is one `(chunk, L)` float32 buffer. With `chunk=None` the chunk is sized so that buffer holds
    about `buffer_elements` values (at least `min_chunk` rows): constant memory up to L = buffer_elements /
    min_chunk patches, linear beyond; never a factor of the head count.
    """

    chunk: int | None = None
    buffer_elements: int = 1 << 25  # 128 MiB of float32 logits
    min_chunk: int = 64
    columns: list[torch.Tensor] = field(default_factory=list)
    key_norms: list[torch.Tensor] = field(default_factory=list)

    def rows_per_chunk(self, num_keys: int) -> int:
        if self.chunk is not None:
            return self.chunk
        return max(self.min_chunk, self.buffer_elements // max(1, num_keys))

    def observe(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, scaling: float
    ) -> None:
        # query/key: (1, H, L, d) for one image
        q, k = query[0], key[0]
        self.columns.append(attention_column_sum(q, k, scaling, chunk=self.rows_per_chunk(k.shape[1])))
        norms = torch.zeros(k.shape[1], dtype=torch.float32, device=k.device)
        for head in range(k.shape[0]):  # one head's float32 copy at a time
            norms += torch.linalg.vector_norm(k[head].float(), dim=-1)
        self.key_norms.append(norms / k.shape[0])


@dataclass
class QueryRowProbe:
    """Attention that chosen query rows pay to all keys in one LLM layer, during prefill only (stage 2 / FastV).

    `rows[b]` receives a (H, Q, Lk) float32 tensor for each sample b listed in `query_index` (absolute query
    positions inside the padded sequence); `key_valid[b]` (bool, Lk) masks padding. Causality is applied here:
    a query never sees keys after itself. Decode steps (one query, or a call when `armed` is False) are ignored.
    Grouped key heads are read in place (query heads viewed as (Hk, group)), never repeated.
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
        group = num_heads // num_kv_heads
        for sample, positions in self.query_index.items():
            num_rows = len(positions)
            q = query[sample, :, positions].float() * scaling  # (H, Q, d)
            k = key[sample].float()  # (Hk, Lk, d)
            grouped = q.reshape(num_kv_heads, group * num_rows, q.shape[-1])  # head h = kv h // group
            logits = torch.matmul(grouped, k.transpose(-1, -2)).reshape(num_heads, num_rows, k.shape[1])
            key_positions = torch.arange(k.shape[1], device=k.device)
            allowed = key_positions[None, :] <= torch.tensor(positions, device=k.device)[:, None]
            if self.key_valid is not None:
                allowed = allowed & self.key_valid[sample][None, :].to(k.device)
            logits = logits.masked_fill(~allowed[None], float("-inf"))
            self.rows[sample] = logits.softmax(dim=-1)
        self.armed = False


__all__ = [
    "ATTENTION_NAME",
    "PROBE_PREFIX",
    "AttentionProbe",
    "ClsRowProbe",
    "ColumnSumProbe",
    "QueryRowProbe",
    "attach_probe",
    "configured_implementation",
    "enable_probes",
    "probe_implementation_name",
]

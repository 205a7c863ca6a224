"""One cached decode step of a Llama-style language model without the transformers model stack, bit-identical.

Llama-style: LLaVA's Llama, Qwen2.5-VL's text model (q/k/v biases) and dense Qwen3-VL's (per-head q/k norms), all
with M-RoPE or plain RoPE ids their own `rotary_emb` turns into cos/sin (`LLAMA_STYLE`).

Why: a decode step feeds one token per sample, so its matrix products are tiny and the step's cost is mostly
Python: the stock `LlavaForConditionalGeneration.forward` builds the causal mask, runs the output-capturing and
kwargs-checking wrappers, and every decoder layer goes through its checkpointing wrapper and our stage-2
pre-hook, each step. Measured on the built-in model (1 CPU thread, `bench/engine_vs_generate.py`'s setting):
8.5 -> 7.1 ms per step at batch 1 and 14.5 -> 12.1 ms at batch 8, the same logits to the last bit. With every
change below, `bench/decode_step.py` gives 0.72x / 0.71x the stock step's time on the built-in model and
0.86x / 0.94x on the Qwen families at smoke widths (batch 1 / 8, an AVX-512 CPU).

The KV cache of the steps is `KVBuffers`: the prefill's cache copied once into buffers with room for the next
tokens, written in place. transformers' `DynamicCache` concatenates every layer's whole cache on every step
(`torch.cat`: 38% of a step's time at batch 8 on the built-in model); the buffers grow by `KVBuffers.chunk`
positions at a time, so the memory stays that of the tokens generated.

Fused projections (`FusedProjections`): each layer's q/k/v weights are moved into one tensor and gate/up into
another, and the `nn.Linear` modules keep row views of them (no extra memory; the stock prefill reads the same
values through the views). A step then runs 3 matrix products per layer instead of 7, and the rotary embedding
once for the query and key heads together. That is used for a batch size only after the fused products gave the
separate ones' results to the last bit on a random probe at that size (`LlamaDecodeStep.fusion_is_exact`):
a BLAS may order a reduction differently for another output width, and then that size keeps the separate
products. Measured on the built-in model (1 CPU thread, alternated, 21 repeats, three runs): with `rms_norm`
below, a step takes 0.83-0.85x the time of the step before these changes at batch 1 and 0.87-0.93x at batch 8;
the fused products alone account for 0.90x / 0.89x of it.

How it stays identical: the same modules and functions do the arithmetic in the same order as
`LlamaDecoderLayer` and `LlamaAttention`, or the Qwen layers, which differ only by the biases and q/k norms that
`_layer` mirrors (the layer's own norm weights through `rms_norm`, which is
`LlamaRMSNorm.forward`'s arithmetic, its projections and MLP, the modeling file's
`apply_rotary_pos_emb`, the configured attention function, the cache's own `update`); only the glue is ours. The
attention mask of each layer is the one the stock path would see: the prompt's padding mask (None when nothing
is padded, as transformers' sdpa mask skips it) before any LLM-side drop, and the stage-2 controller's segment
mask after one (`LayerDropController.decode_key_valid`). Any other model returns None from `LlamaDecodeStep.for_model`
and decodes through the stock forward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import DynamicCache

    from models.engine import LLMInputs

KeyValid = Callable[[int], "torch.Tensor | None"]
"""Per decoder layer: the `(B, L)` padding mask of the sequence its KV cache was filled with, or None when the
layer sees the prompt's own layout (no drop before it)."""


class KVBuffers:
    """Per decoder layer, keys and values `(B, H, capacity, D)` of which the first `lengths[i]` positions are filled.

    Made from the prefill's `DynamicCache` (whose per-layer lengths differ after an LLM-side drop); `update` has
    the cache's contract (append one step, return everything so far) and returns views, never copies.
    """

    chunk = 32
    """Positions added when a layer's buffer is full (and made room for at the start, at most `extra`)."""

    def __init__(self, cache: Any, extra: int) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []
        room = max(1, min(extra, self.chunk))
        for layer in cache.layers:
            self.keys.append(self._with_room(layer.keys, room))
            self.values.append(self._with_room(layer.values, room))
            self.lengths.append(int(layer.keys.shape[2]))

    @staticmethod
    def _with_room(filled: torch.Tensor, room: int) -> torch.Tensor:
        batch, heads, length, dim = filled.shape
        buffer = filled.new_empty(batch, heads, length + room, dim)
        buffer[:, :, :length] = filled
        return buffer

    def get_seq_length(self, index: int) -> int:
        return self.lengths[index]

    def update(self, key: torch.Tensor, value: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one step's `(B, H, 1, D)` key and value to layer `index`; returns its keys and values so far."""
        length = self.lengths[index]
        if length == self.keys[index].shape[2]:
            self.keys[index] = self._with_room(self.keys[index], self.chunk)
            self.values[index] = self._with_room(self.values[index], self.chunk)
        self.keys[index][:, :, length : length + 1] = key
        self.values[index][:, :, length : length + 1] = value
        self.lengths[index] = length + 1
        return self.keys[index][:, :, : length + 1], self.values[index][:, :, : length + 1]


@dataclass(frozen=True)
class FusedProjections:
    """One decoder layer's q/k/v weights as one `(q + 2 kv, hidden)` tensor and gate/up as one `(2 I, hidden)`,
    with their biases fused the same way where the modules have them (Qwen2's q/k/v do)."""

    qkv: torch.Tensor
    gate_up: torch.Tensor
    qkv_bias: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None

    @classmethod
    def fuse(cls, layer: torch.nn.Module) -> FusedProjections | None:
        """Move the layer's weights (and biases) into the fused tensors and point the modules at row views of them.

        None (nothing changed) unless all five are plain `nn.Linear` on one device in one dtype, and within each
        group either every module has a bias or none has.
        """
        attention, mlp = layer.self_attn, layer.mlp
        groups = [
            [attention.q_proj, attention.k_proj, attention.v_proj],
            [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)],
        ]
        modules = [module for group in groups for module in group]
        if any(type(module) is not torch.nn.Linear for module in modules):
            return None
        if any(len({module.bias is None for module in group}) != 1 for group in groups):
            return None
        weights = [module.weight for module in modules]
        if len({(w.device, w.dtype, w.shape[1]) for w in weights}) != 1 or weights[0].device.type == "meta":
            return None
        fused: list[torch.Tensor | None] = []
        for group in groups:
            for attribute in ("weight", "bias"):
                if getattr(group[0], attribute) is None:
                    fused.append(None)
                    continue
                whole = torch.cat([getattr(module, attribute).detach() for module in group])
                start = 0
                for module in group:
                    rows = getattr(module, attribute).shape[0]
                    setattr(
                        module,
                        attribute,
                        torch.nn.Parameter(whole[start : start + rows], requires_grad=False),
                    )
                    start += rows
                fused.append(whole)
        qkv, qkv_bias, gate_up, gate_up_bias = fused
        assert qkv is not None and gate_up is not None
        return cls(qkv=qkv, gate_up=gate_up, qkv_bias=qkv_bias, gate_up_bias=gate_up_bias)


def rms_norm(norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """`LlamaRMSNorm.forward`'s arithmetic without the module call; its casts are skipped in float32 (identities).

    Measured: 40 instead of 68 us per call at batch 1 on the built-in model, 17 calls per step.
    """
    dtype = hidden.dtype
    states = hidden if dtype == torch.float32 else hidden.to(torch.float32)
    variance = states.pow(2).mean(-1, keepdim=True)
    states = states * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * (states if dtype == torch.float32 else states.to(dtype))


LLAMA_STYLE: dict[str, tuple[str, str]] = {
    "LlamaModel": ("LlamaDecoderLayer", "LlamaRMSNorm"),
    "Qwen2_5_VLTextModel": ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLRMSNorm"),
    "Qwen3VLTextModel": ("Qwen3VLTextDecoderLayer", "Qwen3VLTextRMSNorm"),
}
"""Language models whose decoder layer is Llama's, up to what `_layer` mirrors: text model -> (decoder layer,
RMSNorm) class names. Qwen2.5-VL adds biases to q/k/v; Qwen3-VL adds `q_norm`/`k_norm` on each head before the
rotary embedding; both take M-RoPE positions `(3, B, L)`, which their own `rotary_emb` turns into the same
`cos`/`sin` layout as Llama's. Every one of them is checked against its stock forward bit for bit
(`tests/models/test_fast_decode.py`). The MoE text models (another class name) keep the stock forward."""

QK_NORMS = ("q_norm", "k_norm")


class LlamaDecodeStep:
    """`__call__(llm, generated, cache, key_valid)` -> `(B, vocab)` logits of the newest token of `generated`.

    `cache` is the prefill's cache turned into `KVBuffers`, or any cache with `get_seq_length` and `update`
    (transformers' `DynamicCache` works too, at the cost of its concatenations).
    """

    def __init__(self, model: torch.nn.Module, language_model: torch.nn.Module) -> None:
        self.language_model = language_model
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.layers = language_model.layers
        modeling = sys.modules[type(self.layers[0]).__module__]
        self.apply_rotary = modeling.apply_rotary_pos_emb
        fused = [FusedProjections.fuse(layer) for layer in self.layers]
        self.fused: list[FusedProjections] | None = [f for f in fused if f is not None]
        if len(self.fused) != len(fused):  # a layer kept its separate weights: every layer runs `_layer`
            self.fused = None
        self._exact_at: dict[int, bool] = {}  # batch size -> the fused products were exact there
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        config = language_model.config
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, None)

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> LlamaDecodeStep | None:
        """The fast step for a model whose language model is one of `LLAMA_STYLE` with sdpa and no sliding window
        (LLaVA's Llama, Qwen2.5-VL's and dense Qwen3-VL's text models), else None."""
        language_model = getattr(getattr(model, "model", None), "language_model", None)
        kinds = LLAMA_STYLE.get(type(language_model).__name__)
        if kinds is None:
            return None
        layer_kind, norm_kind = kinds
        config = language_model.config
        layers = getattr(language_model, "layers", None)
        if (
            not layers
            or any(type(layer).__name__ != layer_kind for layer in layers)
            or any(
                type(norm).__name__ != norm_kind
                for layer in layers
                for norm in (layer.input_layernorm, layer.post_attention_layernorm)
                + tuple(getattr(layer.self_attn, name) for name in QK_NORMS if hasattr(layer.self_attn, name))
            )
            or any(getattr(layer.self_attn, "sliding_window", None) is not None for layer in layers)
            or type(getattr(language_model, "norm", None)).__name__ != norm_kind
            or getattr(config, "_attn_implementation", None) != "sdpa"
            or getattr(config, "pretraining_tp", 1) != 1
            or model.get_output_embeddings() is None
        ):
            return None
        return cls(model, language_model)

    @torch.inference_mode()
    def __call__(
        self, llm: LLMInputs, generated: torch.Tensor, cache: KVBuffers | DynamicCache, key_valid: KeyValid
    ) -> torch.Tensor:
        """Logits `(B, vocab)` after feeding `generated[:, -1]`, appending its keys and values to `cache`.

        Args:
            llm: The stage-1 sequence the prefill ran on (its padding mask and last original positions).
            generated: `(B, T)` every token generated so far (T >= 1).
            cache: The KV cache the prefill filled (and earlier steps extended).
            key_valid: Each layer's segment padding mask after an LLM-side drop, or None (see `KeyValid`).
        """
        batch = generated.shape[0]
        fused = self.fused if self.fused is not None and self.fusion_is_exact(batch) else None
        hidden = self.embed(generated[:, -1:])
        position = llm.position_ids[..., -1:] + generated.shape[1]
        if position.ndim == 3 and position.shape[0] == 4:  # M-RoPE ids with a text row first: the stock model
            position = position[1:]  # reads the last three for the rotary embedding
        cos, sin = self.language_model.rotary_emb(hidden, position)
        if fused is not None:
            # per head (B, 1, 1, D), and rotate_half's negation moved onto sin (see `_fused_qkv`)
            half = sin.shape[-1] // 2
            cos, sin = cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)
        prompt_valid = llm.attention_mask.bool()
        masks: dict[int, torch.Tensor | None] = {}  # id(segment mask) -> this step's attention mask
        for index, layer in enumerate(self.layers):
            segment = key_valid(index)
            base = prompt_valid if segment is None else segment
            if id(base) not in masks:
                masks[id(base)] = self._mask(base, cache.get_seq_length(index) + 1, segment is None)
            projections = None if fused is None else fused[index]
            hidden = self._layer(layer, projections, hidden, cos, sin, masks[id(base)], cache, index)
        hidden = rms_norm(self.language_model.norm, hidden)
        return self.lm_head(hidden)[:, -1]

    def fusion_is_exact(self, batch: int) -> bool:
        """Whether every layer's fused products equal the separate ones bit for bit at this batch size.

        Checked once per batch size on a seeded random probe, on the model's device and dtype: with the same
        reduction order the results are equal for any input, and a different order shows on a random one.
        """
        known = self._exact_at.get(batch)
        if known is not None:
            return known
        assert self.fused is not None
        first = self.fused[0].qkv
        generator = torch.Generator().manual_seed(batch)
        probe = torch.randn(batch, 1, first.shape[1], generator=generator).to(first.device, first.dtype)
        exact = True
        with torch.inference_mode():
            for layer, fused in zip(self.layers, self.fused, strict=True):
                attention, mlp = layer.self_attn, layer.mlp
                for whole, bias, parts in (
                    (fused.qkv, fused.qkv_bias, (attention.q_proj, attention.k_proj, attention.v_proj)),
                    (fused.gate_up, fused.gate_up_bias, (mlp.gate_proj, mlp.up_proj)),
                ):
                    apart = torch.cat([part(probe) for part in parts], dim=-1)
                    exact = exact and torch.equal(F.linear(probe, whole, bias), apart)
        self._exact_at[batch] = exact
        return exact

    @staticmethod
    def _mask(valid: torch.Tensor, key_length: int, skippable: bool) -> torch.Tensor | None:
        """`(B, 1, 1, key_length)` bool mask: the padding mask extended by the generated tokens.

        The prompt's own layout passes None when nothing is padded (transformers' sdpa mask does the same); a
        segment after a drop always passes its mask (the stage-2 controller's decode hook does).
        """
        extension = torch.ones(
            valid.shape[0], key_length - valid.shape[1], dtype=torch.bool, device=valid.device
        )
        full = torch.cat([valid, extension], dim=1)
        if skippable and bool(full.all()):
            return None
        return full[:, None, None, :]

    def _layer(
        self,
        layer: torch.nn.Module,
        fused: FusedProjections | None,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Any,
        index: int,
    ) -> torch.Tensor:
        """`LlamaDecoderLayer.forward` for one new token per sample, the same operations in the same order.

        With `fused`, the q/k/v and gate/up products come from the fused tensors (3 products instead of 7, the
        same values element for element) and `cos`/`sin` are in the form `__call__` gives them (`_fused_qkv`).
        """
        attention = layer.self_attn
        batch = hidden.shape[0]
        residual = hidden
        hidden = rms_norm(layer.input_layernorm, hidden)
        if fused is None:
            shape = (batch, 1, -1, attention.head_dim)
            query = attention.q_proj(hidden).view(shape)
            key = attention.k_proj(hidden).view(shape)
            if hasattr(attention, "q_norm"):  # Qwen3: per-head RMSNorm before the rotary embedding
                query, key = rms_norm(attention.q_norm, query), rms_norm(attention.k_norm, key)
            query, key = query.transpose(1, 2), key.transpose(1, 2)
            value = attention.v_proj(hidden).view(shape).transpose(1, 2)
            query, key = self.apply_rotary(query, key, cos, sin)
        else:
            query, key, value = self._fused_qkv(attention, fused, hidden, cos, sin)
        key, value = cache.update(key, value, index)
        output, _ = self.attention(attention, query, key, value, mask, dropout=0.0, scaling=attention.scaling)
        output = attention.o_proj(output.reshape(batch, 1, -1).contiguous())
        hidden = residual + output
        residual = hidden
        hidden = rms_norm(layer.post_attention_layernorm, hidden)
        if fused is None:
            return residual + layer.mlp(hidden)
        gate, up = F.linear(hidden, fused.gate_up, fused.gate_up_bias).chunk(2, dim=-1)
        return residual + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    @staticmethod
    def _fused_qkv(
        attention: torch.nn.Module,
        fused: FusedProjections,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query and key (rotated) and value `(B, heads, 1, D)` from the one fused product.

        The rotary embedding is `apply_rotary_pos_emb`'s arithmetic, `x * cos + rotate_half(x) * sin` with
        `rotate_half(x) = cat(-x2, x1)`, on the query and key heads at once, written as
        `x * cos + cat(x2, x1) * cat(-sin1, sin2)`: a negation is exact and a product's sign is the XOR of its
        factors' signs, so `(-a) * b == a * (-b)` bit for bit, and the halves swap in one `roll`. `cos` and `sin`
        come in that form from `__call__`, once per step.
        """
        heads = attention.q_proj.weight.shape[0] // attention.head_dim
        kv_heads = attention.k_proj.weight.shape[0] // attention.head_dim
        projected = F.linear(hidden, fused.qkv, fused.qkv_bias)
        projected = projected.view(hidden.shape[0], 1, -1, attention.head_dim)
        # Qwen3: per-head RMSNorm of query and key before the rotary embedding
        if hasattr(attention, "q_norm"):
            normed = (
                rms_norm(attention.q_norm, projected[:, :, :heads]),
                rms_norm(attention.k_norm, projected[:, :, heads : heads + kv_heads]),
                projected[:, :, heads + kv_heads :],
            )
            projected = torch.cat(normed, dim=2)
        projected = projected.transpose(1, 2)
        query_key = projected[:, : heads + kv_heads]
        rotated = query_key * cos + query_key.roll(query_key.shape[-1] // 2, dims=-1) * sin
        return rotated[:, :heads], rotated[:, heads:], projected[:, heads + kv_heads :]


__all__ = ["LLAMA_STYLE", "FusedProjections", "KVBuffers", "KeyValid", "LlamaDecodeStep"]

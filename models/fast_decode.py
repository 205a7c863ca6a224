"""One cached decode step of a Llama language model without the transformers model stack, bit-identical to it.

Why: a decode step feeds one token per sample, so its matrix products are tiny and the step's cost is mostly
Python: the stock `LlavaForConditionalGeneration.forward` builds the causal mask, runs the output-capturing and
kwargs-checking wrappers, and every decoder layer goes through its checkpointing wrapper and our stage-2
pre-hook, each step. Measured on the built-in model (1 CPU thread, `bench/engine_vs_generate.py`'s setting):
8.5 -> 7.1 ms per step at batch 1 and 14.5 -> 12.1 ms at batch 8, the same logits to the last bit.

The KV cache of the steps is `KVBuffers`: the prefill's cache copied once into buffers with room for the next
tokens, written in place. transformers' `DynamicCache` concatenates every layer's whole cache on every step
(`torch.cat`: 38% of a step's time at batch 8 on the built-in model); the buffers grow by `KVBuffers.chunk`
positions at a time, so the memory stays that of the tokens generated.

How it stays identical: the same modules and functions do the arithmetic in the same order as
`LlamaDecoderLayer` and `LlamaAttention` (the layer's own norms, projections, MLP, the modeling file's
`apply_rotary_pos_emb`, the configured attention function, the cache's own `update`); only the glue is ours. The
attention mask of each layer is the one the stock path would see: the prompt's padding mask (None when nothing
is padded, as transformers' sdpa mask skips it) before any LLM-side drop, and the stage-2 controller's segment
mask after one (`LayerDropController.decode_key_valid`). Any other model returns None from `LlamaDecodeStep.for_model`
and decodes through the stock forward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

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
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        config = language_model.config
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, None)

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> LlamaDecodeStep | None:
        """The fast step for a LLaVA-style model whose language model is a stock `LlamaModel` with sdpa, else None."""
        language_model = getattr(getattr(model, "model", None), "language_model", None)
        if language_model is None or type(language_model).__name__ != "LlamaModel":
            return None
        config = language_model.config
        layers = getattr(language_model, "layers", None)
        if (
            not layers
            or any(type(layer).__name__ != "LlamaDecoderLayer" for layer in layers)
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
        hidden = self.embed(generated[:, -1:])
        position = llm.position_ids[..., -1:] + generated.shape[1]
        cos, sin = self.language_model.rotary_emb(hidden, position)
        prompt_valid = llm.attention_mask.bool()
        masks: dict[int, torch.Tensor | None] = {}  # id(segment mask) -> this step's attention mask
        for index, layer in enumerate(self.layers):
            segment = key_valid(index)
            base = prompt_valid if segment is None else segment
            if id(base) not in masks:
                masks[id(base)] = self._mask(base, cache.get_seq_length(index) + 1, segment is None)
            hidden = self._layer(layer, hidden, cos, sin, masks[id(base)], cache, index, batch)
        hidden = self.language_model.norm(hidden)
        return self.lm_head(hidden)[:, -1]

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
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Any,
        index: int,
        batch: int,
    ) -> torch.Tensor:
        """`LlamaDecoderLayer.forward` for one new token per sample, the same operations in the same order."""
        attention = layer.self_attn
        residual = hidden
        hidden = layer.input_layernorm(hidden)
        shape = (batch, 1, -1, attention.head_dim)
        query = attention.q_proj(hidden).view(shape).transpose(1, 2)
        key = attention.k_proj(hidden).view(shape).transpose(1, 2)
        value = attention.v_proj(hidden).view(shape).transpose(1, 2)
        query, key = self.apply_rotary(query, key, cos, sin)
        key, value = cache.update(key, value, index)
        output, _ = self.attention(attention, query, key, value, mask, dropout=0.0, scaling=attention.scaling)
        output = attention.o_proj(output.reshape(batch, 1, -1).contiguous())
        hidden = residual + output
        residual = hidden
        hidden = layer.post_attention_layernorm(hidden)
        return residual + layer.mlp(hidden)


__all__ = ["KVBuffers", "KeyValid", "LlamaDecodeStep"]

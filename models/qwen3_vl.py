"""Qwen3-VL (`Qwen3VLForConditionalGeneration`, and the MoE `Qwen3VLMoeForConditionalGeneration`) under Nüwa pruning.

The MoE checkpoints differ only in the LLM's MLPs, so both classes run through this one adapter. Family specifics,
read top to bottom:

- Dynamic resolution as in Qwen2.5-VL (the processor, the chat format, `prepare`, `frame_for` and the token
  estimate are inherited from `Qwen2_5_VLAdapter`), but with 16-px patches, so one merged token covers 32 x 32 px,
  and without window attention: every vision block attends over the whole image, image by image.
- Salience: attention RECEIVED in the last vision block, mean over heads, summed over queries, averaged over the
  2x2 patches merged into one token, plus the mean key norm (the paper's option); computed by
  `models.attention.ColumnSumProbe` (head by head, bounded query chunks) from that block's Q and K while the
  block itself keeps the configured attention. The same source as Qwen2.5-VL's last full-attention block; no
  window permutation to undo.
- Similarity: L2-normalised mean of the vision blocks in `PruningConfig.similarity_layers` (default: the last
  third), averaged over each merge group: a running sum kept by forward hooks on those blocks
  (`MergedBlockMean`, shared with Qwen2.5-VL), so no block output outlives its block.
- DeepStack: blocks `deepstack_visual_indexes` (8, 16, 24 of 27 in the released models) each have their own
  merger into the LLM width, and their features are ADDED to the hidden states at the visual positions after LLM
  layers 0, 1, 2. Stage 1 must treat them exactly like the main features, so `EncodedImage.features` holds, per
  token, the main features and every DeepStack level side by side: `(N, (1 + levels) * D)`. Every pruning method
  combines feature ROWS with weights computed from salience, similarity and grid positions, never from the
  features themselves (gather, 2-D pooling, Nüwa's aggregation, VisionZip's group means), so one selection keeps
  the same token indices in every level and Nüwa's merge weights W_ij apply identically to every level: a mended
  token T_i = sum_j W_ij F_j stands for the same neighbours in the input embedding and in each injection.
- The injection itself: transformers' own DeepStack step adds features at the input's visual positions, which no
  longer exist after an LLM-side drop (FastV drops at layer 2 of 36, before the injection after layer 2 is done).
  So the model gets `deepstack_features=[]` (its own step then does nothing) and `DeepStackInjector`, a forward
  hook on each of the first `levels` decoder layers of THIS instance, adds the same values at the visual rows of
  the layout the stage-2 controller currently runs. With no drop before the last injection this is the stock
  computation exactly; a token dropped earlier simply receives no later level.
- Positions: interleaved 3-D M-RoPE ids from `get_rope_index` on the UNPRUNED sequence, gathered for the kept
  tokens (inherited); decoding continues from the last prompt id + 1.
- Offline processor: like Qwen2.5-VL's, the stock `Qwen3VLProcessor` wants a video processor that needs
  torchvision; `Qwen3VLImageOnlyProcessor` is the same processor without the video half.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AutoProcessor, Qwen3VLConfig, Qwen3VLMoeConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from models.attention import ColumnSumProbe, attach_probe
from models.budget import PruningConfig
from models.engine import EncodedImage, LLMInputs, PreparedBatch
from models.pruning import distinctness
from models.qwen2_5_vl import MergedBlockMean, Qwen2_5_VLAdapter, block_range
from models.stage2 import LayerDropController


class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
    """`Qwen3VLProcessor` without the video processor (which imports torchvision).

    `ProcessorMixin` derives the processor's parts from this `__init__` signature, so only the image processor and
    the tokenizer are loaded (also from a real checkpoint whose `processor_class` says `Qwen3VLProcessor`); the
    stock `__init__` (special-token ids) and image-token expansion are inherited unchanged.
    """

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)


AutoProcessor.register(Qwen3VLConfig, Qwen3VLImageOnlyProcessor, exist_ok=True)
AutoProcessor.register(Qwen3VLMoeConfig, Qwen3VLImageOnlyProcessor, exist_ok=True)


class DeepStackInjector:
    """Adds each kept token's DeepStack features after LLM layers 0..levels-1, in the stage-2 controller's layout.

    Armed only around one prefill (`armed`); otherwise the hooks return at once, so cached decode steps (text
    tokens only) and any other use of the model run stock code.
    """

    def __init__(
        self, decoder_layers: torch.nn.ModuleList, controller: LayerDropController, levels: int
    ) -> None:
        self._controller = controller
        self._levels: list[torch.Tensor] | None = None
        self._slot: torch.Tensor | None = None
        self._handles = [
            layer.register_forward_hook(self._make_hook(index))
            for index, layer in enumerate(list(decoder_layers)[:levels])
        ]

    @contextmanager
    def armed(self, levels: list[torch.Tensor], visual: torch.Tensor, trailing: int = 0) -> Iterator[None]:
        """Inject `levels` during the prefill run inside this block.

        Args:
            levels: per DeepStack level, `(V, D)` features of every visual token of the stage-1 batch, sample by
                sample, in sequence order (the order of `visual`'s True entries, row-major).
            visual: `torch.BoolTensor` of shape `(B, L1)`, True at the visual rows of the stage-1 sequence.
            trailing: tokens appended after the prompt in this run (uncached decoding), never visual.
        """
        slot = torch.cumsum(visual.reshape(-1).long(), 0).reshape(visual.shape) - 1
        slot = slot.masked_fill(~visual, -1)
        self._slot = torch.nn.functional.pad(slot, (0, trailing), value=-1)
        self._levels = levels
        try:
            yield
        finally:
            self._levels = None
            self._slot = None

    def _make_hook(self, level: int):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if self._levels is None or self._slot is None:
                return None
            return self._inject(output, self._levels[level], self._slot)

        return hook

    def _inject(self, hidden: torch.Tensor, values: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        layout = self._controller.final_layout()
        if layout is not None:  # rows were dropped: row r now holds stage-1 position index[b, r]
            index, valid = layout
            slot = slot.gather(1, index).masked_fill(~valid, -1)
        rows = slot >= 0
        hidden = hidden.clone()
        hidden[rows] = hidden[rows] + values[slot[rows]].to(hidden.device, hidden.dtype)
        return hidden


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Nüwa pruning for one `Qwen3VLForConditionalGeneration` / `Qwen3VLMoeForConditionalGeneration` instance."""

    family = "qwen3_vl"

    def __init__(self, model: torch.nn.Module, processor: Any, fast_paths: bool = True) -> None:
        super().__init__(model, processor, fast_paths)
        self.deepstack_levels = len(model.config.vision_config.deepstack_visual_indexes)
        self.llm_width = int(model.config.text_config.hidden_size)
        self.deepstack = DeepStackInjector(self.decoder_layers, self.controller, self.deepstack_levels)

    @staticmethod
    def salience_block_index(vision_config: Any) -> int:
        """Every Qwen3-VL vision block attends over the whole image: the last one is the salience block."""
        return int(vision_config.depth) - 1

    def encode_images(self, batch: PreparedBatch, configs: Sequence[PruningConfig]) -> list[EncodedImage]:
        visual = self.model.model.visual
        grid_thw = batch.inputs["image_grid_thw"]
        unit = self.merge_size**2
        depth = len(visual.blocks)
        ranges = {
            config.similarity_layers: block_range(config.similarity_layers, depth) for config in configs
        }
        similarity_sums = MergedBlockMean(visual.blocks, sorted(set(ranges.values())), unit)
        probe = ColumnSumProbe()  # head by head, bounded chunks of queries
        attach_probe(visual.blocks[self.salience_block].attn, probe)
        try:
            pixel_values = batch.inputs["pixel_values"].to(visual.dtype)
            outputs = visual(pixel_values, grid_thw=grid_thw, return_dict=True)
        finally:
            attach_probe(visual.blocks[self.salience_block].attn, None)
            similarity_sums.remove()
        token_counts = (grid_thw.prod(-1) // unit).tolist()
        grids = [(int(h) // self.merge_size, int(w) // self.merge_size) for _, h, w in grid_thw.tolist()]
        # Main features and every DeepStack level side by side: one row per merged token (see module docstring).
        stacked = torch.cat([outputs.pooler_output, *outputs.deepstack_features], dim=-1)
        features = stacked.split(token_counts)
        saliences = torch.cat(probe.columns).view(-1, unit).mean(dim=1).split(token_counts)
        key_norms = torch.cat(probe.key_norms).view(-1, unit).mean(dim=1).split(token_counts)
        similarity = {
            blocks: list(torch.nn.functional.normalize(mean, dim=-1).split(token_counts))
            for blocks, mean in similarity_sums.means().items()
        }
        return [
            EncodedImage(
                features=features[b],
                salience=saliences[b],
                similarity=similarity[ranges[config.similarity_layers]][b],
                key_norm=key_norms[b],
                grid=grids[b],
                distinct=distinctness(features[b][:, : self.llm_width]),  # main features, not DeepStack's
            )
            for b, config in enumerate(configs)
        ]

    # `project` (inherited) is the identity: stage 1 hands on (K1, (1 + levels) * D) rows, split at the LLM call.

    def image_encoder_outputs(
        self, features: tuple[torch.Tensor, ...]
    ) -> BaseModelOutputWithDeepstackFeatures:
        """The main features only; the DeepStack levels go through `DeepStackInjector` (see `run_llm`)."""
        main = tuple(sample[:, : self.llm_width] for sample in features)
        return BaseModelOutputWithDeepstackFeatures(pooler_output=main, deepstack_features=[])

    def deepstack_levels_of(self, features: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Per DeepStack level, the `(V, D)` rows of every kept token of the batch, sample by sample."""
        width = self.llm_width
        return [
            torch.cat([sample[:, (level + 1) * width : (level + 2) * width] for sample in features])
            for level in range(self.deepstack_levels)
        ]

    def run_llm(
        self,
        llm: LLMInputs,
        trailing: torch.Tensor | None = None,
        cache: Any = None,
        logits_to_keep: int = 0,
    ) -> Any:
        num_trailing = 0 if trailing is None else int(trailing.shape[1])
        with self.deepstack.armed(self.deepstack_levels_of(llm.features), llm.visual, trailing=num_trailing):
            return super().run_llm(llm, trailing=trailing, cache=cache, logits_to_keep=logits_to_keep)


__all__ = [
    "DeepStackInjector",
    "Qwen3VLAdapter",
    "Qwen3VLImageOnlyProcessor",
]

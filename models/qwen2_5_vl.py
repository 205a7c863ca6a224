"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) under Nüwa pruning.

Family specifics, read top to bottom:
- Dynamic resolution: every image has its own (H/28) x (W/28) grid of merged tokens; the batch's vision tower
  runs once over all images packed together (attention is per image).
- Salience: attention RECEIVED in the last FULL-attention vision block (the last of `fullatt_block_indexes`; the
  blocks after it, if any, are windowed), mean over heads, summed over queries, averaged over the 2x2 patches
  merged into one token. Computed as one column sum from that block's Q and K, head by head and in query chunks
  (`models/attention.py`); the block output and every other block keep the configured attention kernel.
- Similarity: L2-normalised mean of the middle-to-late vision blocks, averaged over each merge group. It is
  accumulated by forward hooks on just those blocks into one running (tokens, hidden) float32 sum per distinct
  layer range of the batch, so no block's hidden states outlive the next block (a 12.8 MP image has ~65k
  patches: keeping every block's states would cost 335 MB per block in float32).
- Positions: 3-D M-RoPE ids from `get_rope_index` on the UNPRUNED sequence, gathered for the kept tokens; text
  keeps its unpruned ids and decoding continues from the last prompt id + 1 (the unpruned rope delta).
- Offline processor: the stock `Qwen2_5_VLProcessor` insists on a video processor that needs torchvision, which
  this stack cannot have; `Qwen2_5_VLImageOnlyProcessor` is the same processor without the video half.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.vision_utils import get_vision_window_index

from models.attention import ColumnSumProbe, attach_probe
from models.boxes import Frame
from models.budget import PruningConfig
from models.engine import EncodedImage, PreparedBatch, VisionLanguageAdapter
from models.geometry import SmartResizeGeometry

QWEN_FALLBACK_TEMPLATE = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
)


class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video processor (which imports torchvision).

    `ProcessorMixin` derives the processor's parts from this `__init__` signature, so only the image processor and
    the tokenizer are loaded; image-token expansion and `mm_token_type_ids` are inherited unchanged.
    """

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs
    ):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = (
            tokenizer.convert_tokens_to_ids(self.image_token) if tokenizer is not None else None
        )
        self.video_token_id = (
            tokenizer.convert_tokens_to_ids(self.video_token) if tokenizer is not None else None
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor, exist_ok=True)


def last_full_attention_block(vision_config: Any) -> int:
    """Index of the last full-attention vision block (Nüwa's salience block); windowed blocks may follow it."""
    depth = int(vision_config.depth)
    full = [
        int(i) for i in (getattr(vision_config, "fullatt_block_indexes", None) or []) if 0 <= int(i) < depth
    ]
    if not full:
        raise ValueError(
            f"the vision tower has no full-attention block (fullatt_block_indexes="
            f"{getattr(vision_config, 'fullatt_block_indexes', None)!r}, depth {depth}): salience needs one"
        )
    return max(full)


def block_range(fractions: tuple[float, float], depth: int) -> tuple[int, int]:
    """(first, last) block index, inclusive, of a similarity layer range given as fractions of the depth."""
    first = max(0, round(fractions[0] * depth) - 1)
    last = max(first, round(fractions[1] * depth) - 1)
    return first, min(last, depth - 1)


class MergedBlockMean:
    """Running mean of the outputs of chosen vision blocks, merged per spatial-merge group, via forward hooks.

    For each (first, last) range, one float32 `(L / unit, D)` sum is kept and every block in the range adds its
    output (window-permuted order, consecutive `unit` rows = one merged token) to it as it is produced; the block
    outputs themselves are freed by the tower as usual. Peak extra memory: one `(L / unit, D)` float32 tensor per
    distinct range (one in practice), independent of the depth.
    """

    def __init__(self, blocks: torch.nn.ModuleList, ranges: Sequence[tuple[int, int]], unit: int) -> None:
        self.unit = unit
        self.ranges = list(ranges)
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        wanted = sorted({i for first, last in self.ranges for i in range(first, last + 1)})
        self.handles = [blocks[i].register_forward_hook(self._hook(i)) for i in wanted]

    def _hook(self, index: int) -> Any:
        def add(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # (L, D), window-permuted
            grouped = hidden.view(-1, self.unit, hidden.shape[-1])
            for blocks in self.ranges:
                if blocks[0] <= index <= blocks[1]:
                    total = self.sums.get(blocks)
                    if total is None:
                        total = self.sums[blocks] = torch.zeros(
                            grouped.shape[0], grouped.shape[2], dtype=torch.float32, device=hidden.device
                        )
                    for member in range(self.unit):  # no float32 copy of the whole block output
                        total.add_(grouped[:, member])

        return add

    def means(self) -> dict[tuple[int, int], torch.Tensor]:
        """Per range: `(L / unit, D)` float32 mean over its blocks and over each merge group (window order)."""
        return {
            blocks: total / ((blocks[1] - blocks[0] + 1) * self.unit) for blocks, total in self.sums.items()
        }

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class Qwen2_5_VLAdapter(VisionLanguageAdapter):
    """Nüwa pruning for one `Qwen2_5_VLForConditionalGeneration` instance."""

    family = "qwen2_5_vl"
    fallback_template = QWEN_FALLBACK_TEMPLATE

    def __init__(self, model: torch.nn.Module, processor: Any, fast_paths: bool = True) -> None:
        super().__init__(model, processor, fast_paths)
        self.tokenizer.padding_side = "left"
        vision = model.config.vision_config
        self.merge_size = int(vision.spatial_merge_size)
        self.patch_size = int(vision.patch_size)
        self.salience_block = self.salience_block_index(vision)

    @staticmethod
    def salience_block_index(vision_config: Any) -> int:
        """The vision block whose received attention is the salience: the last full-attention one."""
        return last_full_attention_block(vision_config)

    # ---- family hooks ----------------------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def prepare(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> PreparedBatch:
        rgb_images = [image.convert("RGB") for image in images]
        sizes = original_sizes or [image.size for image in rgb_images]
        texts = [self.format_prompt(prompt) for prompt in prompts]
        inputs = self.processor(images=rgb_images, text=texts, padding=True, return_tensors="pt")
        inputs = {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}
        frames = [
            Frame.resize(size, (int(w) * self.patch_size, int(h) * self.patch_size))
            for size, (_, h, w) in zip(sizes, inputs["image_grid_thw"].tolist(), strict=True)
        ]
        return PreparedBatch(inputs=inputs, frames=frames)

    @property
    def geometry(self) -> SmartResizeGeometry:
        """The processor's smart resize: sides multiples of patch x merge, pixels within its min/max bounds."""
        size = getattr(self.processor.image_processor, "size", None) or {}
        return SmartResizeGeometry(
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            min_pixels=int(size.get("shortest_edge", 56 * 56)),
            max_pixels=int(size.get("longest_edge", 28 * 28 * 1280)),
        )

    def vision_subset(self, batch: PreparedBatch, indices: Sequence[int]) -> PreparedBatch:
        """Some images' patches only: `pixel_values` packs every image's patches one after another."""
        grid_thw = batch.inputs["image_grid_thw"]
        counts = grid_thw.prod(-1).tolist()
        starts = [sum(counts[:b]) for b in range(len(counts))]
        pixel_values = torch.cat(
            [batch.inputs["pixel_values"][starts[b] : starts[b] + counts[b]] for b in indices]
        )
        inputs = {"pixel_values": pixel_values, "image_grid_thw": grid_thw[list(indices)]}
        return PreparedBatch(inputs=inputs, frames=[batch.frames[b] for b in indices])

    def encode_images(self, batch: PreparedBatch, configs: Sequence[PruningConfig]) -> list[EncodedImage]:
        visual = self.model.model.visual
        grid_thw = batch.inputs["image_grid_thw"]
        depth = len(visual.blocks)
        unit = self.merge_size**2
        ranges = {
            config.similarity_layers: block_range(config.similarity_layers, depth) for config in configs
        }
        similarity = MergedBlockMean(visual.blocks, sorted(set(ranges.values())), unit)
        probe = ColumnSumProbe()
        attention = visual.blocks[self.salience_block].attn
        attach_probe(attention, probe)
        try:
            pixel_values = batch.inputs["pixel_values"].to(visual.dtype)
            outputs = visual(pixel_values, grid_thw=grid_thw, return_dict=True)
        finally:
            attach_probe(attention, None)
            similarity.remove()
        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=self.merge_size,
            window_size=visual.window_size,
            patch_size=self.patch_size,
        )
        reverse = torch.argsort(window_index)
        columns = torch.cat(probe.columns)
        salience = columns.view(-1, unit).mean(dim=1)[reverse]
        key_norm = torch.cat(probe.key_norms).view(-1, unit).mean(dim=1)[reverse]
        token_counts = (grid_thw.prod(-1) // unit).tolist()
        grids = [(int(h) // self.merge_size, int(w) // self.merge_size) for _, h, w in grid_thw.tolist()]
        features = outputs.pooler_output.split(token_counts)
        saliences = salience.split(token_counts)
        key_norms = key_norm.split(token_counts)
        similarity_per_range = {
            blocks: list(torch.nn.functional.normalize(mean[reverse], dim=-1).split(token_counts))
            for blocks, mean in similarity.means().items()
        }
        return [
            EncodedImage(
                features=features[b],
                salience=saliences[b],
                similarity=similarity_per_range[ranges[config.similarity_layers]][b],
                key_norm=key_norms[b],
                grid=grids[b],
            )
            for b, config in enumerate(configs)
        ]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def unpruned_positions(self, batch: PreparedBatch) -> torch.Tensor:
        inputs = batch.inputs
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return positions


__all__ = [
    "MergedBlockMean",
    "Qwen2_5_VLAdapter",
    "Qwen2_5_VLImageOnlyProcessor",
    "block_range",
    "last_full_attention_block",
]

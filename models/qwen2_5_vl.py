"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) under Nüwa pruning.

Family specifics, read top to bottom:
- Dynamic resolution: every image has its own (H/28) x (W/28) grid of merged tokens; the batch's vision tower
  runs once over all images packed together (attention is per image).
- Salience: attention RECEIVED in the last vision block (full attention), mean over heads, summed over queries,
  averaged over the 2x2 patches merged into one token. Computed as one column sum from that block's Q and K; the
  block output itself stays SDPA.
- Similarity: L2-normalised mean of the middle-to-late vision blocks, averaged over each merge group.
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


class Qwen2_5_VLAdapter(VisionLanguageAdapter):
    """Nüwa pruning for one `Qwen2_5_VLForConditionalGeneration` instance."""

    family = "qwen2_5_vl"

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        self.tokenizer.padding_side = "left"
        vision = model.config.vision_config
        self.merge_size = int(vision.spatial_merge_size)
        self.patch_size = int(vision.patch_size)

    # ---- family hooks ----------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.model.language_model.layers

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def format_prompt(self, prompt: str) -> str:
        template = getattr(self.processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        if template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return QWEN_FALLBACK_TEMPLATE.format(prompt=prompt)

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
        probe = ColumnSumProbe()
        attach_probe(visual.blocks[-1].attn, probe)
        try:
            pixel_values = batch.inputs["pixel_values"].to(visual.dtype)
            outputs = visual(pixel_values, grid_thw=grid_thw, output_hidden_states=True, return_dict=True)
        finally:
            attach_probe(visual.blocks[-1].attn, None)
        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=self.merge_size,
            window_size=visual.window_size,
            patch_size=self.patch_size,
        )
        reverse = torch.argsort(window_index)
        unit = self.merge_size**2
        columns = torch.cat(probe.columns)
        salience = columns.view(-1, unit).mean(dim=1)[reverse]
        key_norm = torch.cat(probe.key_norms).view(-1, unit).mean(dim=1)[reverse]
        block_states = outputs.hidden_states[-len(visual.blocks) :]
        token_counts = (grid_thw.prod(-1) // unit).tolist()
        grids = [(int(h) // self.merge_size, int(w) // self.merge_size) for _, h, w in grid_thw.tolist()]
        features = outputs.pooler_output.split(token_counts)
        saliences = salience.split(token_counts)
        key_norms = key_norm.split(token_counts)
        depth = len(block_states)
        similarity_cache: dict[tuple[float, float], list[torch.Tensor]] = {}
        encoded = []
        for b, config in enumerate(configs):
            layers = config.similarity_layers
            if layers not in similarity_cache:
                first = max(0, round(layers[0] * depth) - 1)
                last = max(first, round(layers[1] * depth) - 1)
                mean = torch.stack([block_states[i] for i in range(first, last + 1)]).float().mean(0)
                merged = mean.view(-1, unit, mean.shape[-1]).mean(dim=1)[reverse]
                similarity_cache[layers] = list(
                    torch.nn.functional.normalize(merged, dim=-1).split(token_counts)
                )
            encoded.append(
                EncodedImage(
                    features=features[b],
                    salience=saliences[b],
                    similarity=similarity_cache[layers][b],
                    key_norm=key_norms[b],
                    grid=grids[b],
                )
            )
        return encoded

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


__all__ = ["Qwen2_5_VLAdapter", "Qwen2_5_VLImageOnlyProcessor"]

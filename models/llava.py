"""LLaVA-1.5 (`LlavaForConditionalGeneration`: CLIP vision tower + projector + Llama) under Nüwa pruning.

Family specifics, read top to bottom:
- Images are padded to a square with the image-mean colour before the stock processor (LLaVA-1.5's "pad" aspect
  mode), so nothing is cropped away and a box on the model input maps back to the original pixels exactly
  (`frame_for` describes the geometry once; `prepare` applies that same geometry).
- Salience: CLS->patch attention of the CLIP layer whose output feeds the projector (`vision_feature_layer`,
  -2 for LLaVA-1.5), summed over heads; only the CLS row is computed (see `models/attention.py`).
- Similarity: L2-normalised mean of the middle-to-late CLIP layers (CLIP-L: hidden states 16..24).
- Aggregation happens on the selected CLIP features BEFORE the projector; kept tokens are then projected.
- Positions are 1-D: the unpruned sequence's `cumsum(attention_mask) - 1`, gathered for the kept tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from models.attention import ClsRowProbe, attach_probe
from models.budget import PruningConfig
from models.engine import EncodedImage, PreparedBatch, VisionLanguageAdapter
from models.geometry import PaddedSquareGeometry

LLAVA_FALLBACK_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Pad an RGB image to a centred square; returns the square and the (x, y) offset of the original in it."""
    width, height = image.size
    side = max(width, height)
    if width == height:
        return image, (0, 0)
    canvas = Image.new("RGB", (side, side), fill)
    offset = ((side - width) // 2, (side - height) // 2)
    canvas.paste(image, offset)
    return canvas, offset


class LlavaAdapter(VisionLanguageAdapter):
    """Nüwa pruning for one `LlavaForConditionalGeneration` instance."""

    family = "llava"

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        super().__init__(model, processor)
        strategy = model.config.vision_feature_select_strategy
        layer = model.config.vision_feature_layer
        if strategy != "default" or not isinstance(layer, int) or layer == 0:
            raise ValueError(
                f"pruning needs one vision feature layer with the CLS token dropped; got layer={layer!r}, "
                f"strategy={strategy!r}"
            )
        self.vision_feature_layer = layer
        self.tokenizer.padding_side = "left"

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

    @property
    def vision_layers(self) -> torch.nn.ModuleList:
        tower = self.model.model.vision_tower
        tower = getattr(
            tower, "vision_model", tower
        )  # CLIPVisionModel wraps the transformer in older versions
        return tower.encoder.layers

    @property
    def input_side(self) -> int:
        crop = getattr(self.processor.image_processor, "crop_size", None)
        if isinstance(crop, dict) and "height" in crop:
            return int(crop["height"])
        return int(self.model.config.vision_config.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.input_side // int(self.model.config.vision_config.patch_size)
        return side, side

    def pad_fill(self) -> tuple[int, int, int]:
        mean = getattr(self.processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        return tuple(int(round(255 * m)) for m in mean)  # type: ignore[return-value]

    def format_prompt(self, prompt: str) -> str:
        """The chat-formatted text for one user prompt with one image."""
        template = getattr(self.processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        if template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return LLAVA_FALLBACK_TEMPLATE.format(prompt=prompt)

    def prepare(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> PreparedBatch:
        squares, frames = [], []
        fill = self.pad_fill()
        sizes = original_sizes or [image.size for image in images]
        for image, original_size in zip(images, sizes, strict=True):
            rgb = image.convert("RGB")
            shrunk = self.geometry.shrink_size(rgb.size)
            if shrunk is not None:
                rgb = rgb.resize(shrunk, Image.Resampling.BILINEAR)
            square, _ = expand_to_square(rgb, fill)
            squares.append(square)
            frames.append(self.frame_for(original_size))
        texts = [self.format_prompt(prompt) for prompt in prompts]
        inputs = self.processor(images=squares, text=texts, padding=True, return_tensors="pt")
        inputs = {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}
        return PreparedBatch(inputs=inputs, frames=frames)

    @property
    def geometry(self) -> PaddedSquareGeometry:
        """Shrink beyond 2 x input_side (so padding never allocates a huge canvas), pad, resize to the input side."""
        return PaddedSquareGeometry(
            input_side=self.input_side, grid=self.grid, shrink_limit=2 * self.input_side
        )

    def encode_images(self, batch: PreparedBatch, configs: Sequence[PruningConfig]) -> list[EncodedImage]:
        vision_tower = self.model.model.vision_tower
        num_layers = len(self.vision_layers)
        layer = self.vision_feature_layer
        probe_layer = num_layers + layer if layer < 0 else layer - 1
        probe = ClsRowProbe()
        attach_probe(self.vision_layers[probe_layer].self_attn, probe)
        try:
            pixel_values = batch.inputs["pixel_values"].to(self.model.dtype)
            outputs = vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        finally:
            attach_probe(self.vision_layers[probe_layer].self_attn, None)
        hidden_states = outputs.hidden_states
        features = hidden_states[layer][:, 1:]
        encoded = []
        for b, config in enumerate(configs):
            start, end = config.similarity_layers
            first = max(1, round(start * num_layers))
            last = max(first, round(end * num_layers))
            similarity = (
                torch.stack([hidden_states[i][b, 1:] for i in range(first, last + 1)]).float().mean(0)
            )
            encoded.append(
                EncodedImage(
                    features=features[b],
                    salience=probe.salience[b],
                    similarity=torch.nn.functional.normalize(similarity, dim=-1),
                    key_norm=probe.key_norm[b],
                    grid=self.grid,
                )
            )
        return encoded

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def unpruned_positions(self, batch: PreparedBatch) -> torch.Tensor:
        mask = batch.inputs["attention_mask"].long()
        return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


__all__ = ["LlavaAdapter", "expand_to_square"]

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
- Older llava-hf conversions ship a `processor_config.json` without `num_additional_image_tokens` (or
  `patch_size`, `vision_feature_select_strategy`); the stock processor then expands `<image>` to 575 placeholders
  for 576 visual tokens and every request fails. What the processor must know is read from the model itself
  (`align_processor_with_model`: a CLIP tower with a CLS token adds one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from models.attention import ClsRowProbe, attach_probe
from models.budget import PruningConfig
from models.clip_pixels import ClipPixels
from models.engine import EncodedImage, PreparedBatch, VisionLanguageAdapter
from models.geometry import PaddedSquareGeometry
from models.methods import get_method

LLAVA_FALLBACK_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"

logger = logging.getLogger(__name__)


def vision_additional_tokens(model: torch.nn.Module) -> int:
    """Tokens the vision tower adds in front of its patches: 1 for CLIP's CLS token, 0 for SigLIP-style towers."""
    tower = model.model.vision_tower
    embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
    positions, patches = getattr(embeddings, "num_positions", None), getattr(embeddings, "num_patches", None)
    if isinstance(positions, int) and isinstance(patches, int):
        return positions - patches
    return 1 if getattr(embeddings, "class_embedding", None) is not None else 0


def align_processor_with_model(model: torch.nn.Module, processor: Any) -> dict[str, object]:
    """Set the processor fields that decide the `<image>` expansion from the model; returns what was changed.

    The model is the ground truth: the processor must expand `<image>` to exactly the tokens the vision tower
    yields after the feature-select strategy, otherwise every request fails in the sequence rebuild.
    """
    expected = {
        "patch_size": int(model.config.vision_config.patch_size),
        "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
        "num_additional_image_tokens": vision_additional_tokens(model),
    }
    changed = {}
    for name, value in expected.items():
        if hasattr(processor, name) and getattr(processor, name) != value:
            changed[name] = (getattr(processor, name), value)
            setattr(processor, name, value)
    if changed:
        logger.warning(
            "processor settings corrected from the model (processor_config.json lacks or contradicts them): %s",
            ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items()),
        )
    return changed


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


def clip_layer_range(fractions: tuple[float, float], num_layers: int) -> tuple[int, int]:
    """(first, last) encoder layer index, inclusive, of a similarity range given as fractions of the depth.

    The fractions name hidden states 1..num_layers (hidden state i = output of encoder layer i - 1); CLIP-L with
    the default (0.65, 1.0) gives hidden states 16..24.
    """
    first = max(1, round(fractions[0] * num_layers))
    last = max(first, round(fractions[1] * num_layers))
    return first - 1, min(last, num_layers) - 1


class ClipLayerOutputs:
    """Forward hooks on CLIP encoder layers: the feature layer's output, and a running float32 sum per range.

    Replaces `output_hidden_states=True` + stacking: only the layers that are needed are read, and the similarity
    mean is accumulated as the layers run (one `(B, 1 + N, D)` float32 tensor per distinct range).
    """

    def __init__(
        self, layers: torch.nn.ModuleList, feature_layer: int, ranges: Sequence[tuple[int, int]]
    ) -> None:
        self.feature_layer = feature_layer
        self.ranges = list(ranges)
        self.features: torch.Tensor | None = None
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        wanted = sorted({feature_layer} | {i for first, last in self.ranges for i in range(first, last + 1)})
        self.handles = [layers[i].register_forward_hook(self._hook(i)) for i in wanted]

    def _hook(self, index: int) -> Any:
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # (B, 1 + N, D)
            if index == self.feature_layer:
                self.features = hidden
            for blocks in self.ranges:
                if blocks[0] <= index <= blocks[1]:
                    if blocks in self.sums:
                        self.sums[blocks].add_(hidden)
                    else:
                        self.sums[blocks] = hidden.float().clone()

        return record

    def means(self) -> dict[tuple[int, int], torch.Tensor]:
        return {blocks: total / (blocks[1] - blocks[0] + 1) for blocks, total in self.sums.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class LlavaAdapter(VisionLanguageAdapter):
    """Nüwa pruning for one `LlavaForConditionalGeneration` instance."""

    family = "llava"
    fallback_template = LLAVA_FALLBACK_TEMPLATE

    def __init__(self, model: torch.nn.Module, processor: Any, fast_paths: bool = True) -> None:
        super().__init__(model, processor, fast_paths)
        strategy = model.config.vision_feature_select_strategy
        layer = model.config.vision_feature_layer
        if strategy != "default" or not isinstance(layer, int) or layer == 0:
            raise ValueError(
                f"pruning needs one vision feature layer with the CLS token dropped; got layer={layer!r}, "
                f"strategy={strategy!r}"
            )
        self.vision_feature_layer = layer
        align_processor_with_model(model, processor)
        self.tokenizer.padding_side = "left"
        self.clip_pixels = ClipPixels.from_processor(processor.image_processor) if fast_paths else None

    # ---- family hooks ----------------------------------------------------------------------------------------
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
        inputs = self.fast_inputs(squares, texts)
        if inputs is None:
            inputs = self.processor(images=squares, text=texts, padding=True, return_tensors="pt")
        inputs = {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}
        return PreparedBatch(inputs=inputs, frames=frames)

    def fast_inputs(self, squares: Sequence[Image.Image], texts: Sequence[str]) -> dict[str, Any] | None:
        """The stock processor's output, bit for bit, without its per-image cost (`models.clip_pixels`).

        The pixels come from the lookup-table path; the text is expanded with the processor's own
        `replace_image_token` and tokenised by its tokenizer, so the token layout is the processor's. None
        (use the stock processor) when the image processor is not the CLIP configuration the fast path
        reproduces, or a prompt does not hold exactly one image token (the processor then raises its own error).
        """
        image_token = getattr(self.processor, "image_token", None)
        if self.clip_pixels is None or image_token is None or any(t.count(image_token) != 1 for t in texts):
            return None
        pixel_values = self.clip_pixels(squares)
        replacement = self.processor.replace_image_token({"pixel_values": pixel_values}, image_idx=0)
        expanded = [text.replace(image_token, replacement) for text in texts]
        text_inputs = self.processor.tokenizer(expanded, padding=True, return_tensors="pt")
        return {**text_inputs, "pixel_values": pixel_values}

    @property
    def geometry(self) -> PaddedSquareGeometry:
        """Shrink beyond 2 x input_side (so padding never allocates a huge canvas), pad, resize to the input side."""
        return PaddedSquareGeometry(
            input_side=self.input_side, grid=self.grid, shrink_limit=2 * self.input_side
        )

    def encode_images(self, batch: PreparedBatch, configs: Sequence[PruningConfig]) -> list[EncodedImage]:
        layers = self.vision_layers
        num_layers = len(layers)
        layer = self.vision_feature_layer
        feature_layer = num_layers + layer if layer < 0 else layer - 1  # encoder layer whose output is used
        needs = [get_method(config.method).needs_similarity(config) for config in configs]
        ranges = {
            config.similarity_layers: clip_layer_range(config.similarity_layers, num_layers)
            for config, need in zip(configs, needs, strict=True)
            if need
        }
        last_layer = max([feature_layer, *(last for _, last in ranges.values())])
        recorder = ClipLayerOutputs(layers, feature_layer, sorted(set(ranges.values())))
        probe = ClsRowProbe()
        attach_probe(layers[feature_layer].self_attn, probe)
        try:
            pixel_values = batch.inputs["pixel_values"].to(self.model.dtype)
            self.run_vision_layers(pixel_values, last_layer)
        finally:
            attach_probe(layers[feature_layer].self_attn, None)
            recorder.remove()
        features = recorder.features[:, 1:]
        similarity = {
            blocks: torch.nn.functional.normalize(mean[:, 1:], dim=-1)
            for blocks, mean in recorder.means().items()
        }
        return [
            EncodedImage(
                features=features[b],
                salience=probe.salience[b],
                similarity=similarity[ranges[config.similarity_layers]][b] if need else None,
                key_norm=probe.key_norm[b],
                grid=self.grid,
            )
            for b, (config, need) in enumerate(zip(configs, needs, strict=True))
        ]

    def run_vision_layers(self, pixel_values: torch.Tensor, last_layer: int) -> None:
        """Run the CLIP tower through encoder layer `last_layer` only (the hooks read what they need).

        Why: `LlavaForConditionalGeneration` runs every CLIP layer although the projector reads the penultimate
        one (`vision_feature_layer` -2); the last layer only feeds the similarity mean, which only aggregation and
        VisionZip use. Stopping at the feature layer skips 1 of the built-in model's 6 layers and 1 of CLIP-L's
        24 for every batch that does not aggregate (unpruned requests, FastV, ...), with the same outputs: the
        same modules run in the same order as in `CLIPVisionTransformer.forward`. A tower of another layout
        (no `pre_layrnorm`, e.g. SigLIP) runs whole, through its own forward.
        """
        tower = self.model.model.vision_tower
        vision_model = getattr(tower, "vision_model", tower)
        layers = self.vision_layers
        stock_layout = (
            hasattr(vision_model, "embeddings")
            and hasattr(vision_model, "pre_layrnorm")
            and getattr(getattr(vision_model, "encoder", None), "layers", None) is layers
        )
        if not self.fast_paths or not stock_layout or last_layer >= len(layers) - 1:
            tower(pixel_values, return_dict=True)
            return
        hidden = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values))
        for encoder_layer in layers[: last_layer + 1]:
            hidden = encoder_layer(hidden, None)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def unpruned_positions(self, batch: PreparedBatch) -> torch.Tensor:
        mask = batch.inputs["attention_mask"].long()
        return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


__all__ = [
    "ClipLayerOutputs",
    "LlavaAdapter",
    "align_processor_with_model",
    "clip_layer_range",
    "expand_to_square",
    "vision_additional_tokens",
]

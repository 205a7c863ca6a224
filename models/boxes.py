"""Boxes: each family's grounding prompt and answer format, and the one `Frame` that maps them to image pixels.

Every family writes boxes differently, so the service asks each one in its own words (`grounding_prompt`)
and reads the answer with the matching parser (`parse_boxes`). Parsers return boxes normalised to the
*model input frame* (0..1 of the image the model actually saw: the padded square for LLaVA-style models,
the smart-resized image for Qwen2.5-VL and Qwen3-VL); the adapter, which knows how it prepared the image, describes that with
a `Frame`, and `Frame.to_original` maps the boxes to original pixels.

Formats:
    * ``loc_tokens`` (the built-in model): Florence-2 style location tokens ``<loc_x1><loc_y1><loc_x2><loc_y2>``,
      k in 0..999, decoded as (k + 0.5) / 1000 of the input frame. Chosen with evidence
      (shared/research/feasibility.md, Q6): on this CPU, absolute digit strings ``[x1, y1, x2, y2]`` did not
      learn at all in 14 CPU-minutes (the model emitted one constant box), while quantised location tokens,
      each a single token id with its own embedding, learned single-object grounding to 100% Acc@0.5 in
      ~1 900 steps. One token per coordinate also keeps answers 4 tokens long, which matters for greedy
      decoding on a CPU.
    * ``qwen2_5_vl_json``: ``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]`` in absolute pixels of the
      resized model input, often wrapped in a fenced json block and followed by prose.
    * ``qwen3_vl_json``: the same JSON, ``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}, ...]``, but in RELATIVE
      coordinates 0..1000 of the model input (Qwen3-VL cookbook: every image is described as if it were 1000 x
      1000), so no input size is needed; values above 1000 (which the model does emit near the right and bottom
      edges) are clamped to the edge. Several boxes per answer, a fenced json block and prose around it are read
      the same way as for Qwen2.5-VL.
    * ``llava_norm``: ``[0.12, 0.30, 0.55, 0.80]``, floats in 0..1 of the padded square (LLaVA-1.5 RefCOCO).

Pure Python on purpose: the API process may import it to render answers without pulling in torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

BoxFormat = Literal["loc_tokens", "qwen2_5_vl_json", "qwen3_vl_json", "llava_norm"]
BOX_FORMATS: tuple[BoxFormat, ...] = ("loc_tokens", "qwen2_5_vl_json", "qwen3_vl_json", "llava_norm")

LOC_BINS = 1000
"""Number of location tokens `<loc_0>` .. `<loc_999>` (Florence-2 quantisation)."""

QWEN3_RELATIVE_SCALE = 1000.0
"""Qwen3-VL writes box coordinates in 0..1000 of the image it saw, whatever its size."""

# Smallest accepted side of a normalised box; anything thinner is a degenerate answer, not a box.
_MIN_SIDE = 1e-6

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_LOC_GROUP_RE = re.compile(r"<loc_(\d+)>\s*<loc_(\d+)>\s*<loc_(\d+)>\s*<loc_(\d+)>")
_FOUR_NUMBERS_RE = re.compile(
    rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]",
)
_BBOX_2D_RE = re.compile(
    rf"\"bbox_2d\"\s*:\s*\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]"
    rf"(?:\s*,\s*\"label\"\s*:\s*\"([^\"]*)\")?",
)
_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class ParsedBox:
    """One box read from a model answer.

    Attributes:
        label: What the box is of: the model's own label when the format has one, else the caller's.
        xyxy_norm: (x1, y1, x2, y2) in 0..1 of the model input frame, x1 < x2 and y1 < y2.
    """

    label: str
    xyxy_norm: tuple[float, float, float, float]


def grounding_prompt(phrase: str, fmt: BoxFormat) -> str:
    """The grounding instruction each family was trained on, so it answers in its own box format.

    Args:
        phrase: The referring expression, e.g. "the red circle".
        fmt: The family's box format.

    Returns:
        The user text to put after the image.
    """
    if fmt == "loc_tokens":
        return f"Locate {phrase}."
    if fmt == "qwen2_5_vl_json":
        return f"Locate {phrase} in the image, output its bbox coordinates using JSON format."
    if fmt == "qwen3_vl_json":
        return f"Locate {phrase} in the image. Report bbox coordinates in JSON format."
    if fmt == "llava_norm":
        return f"Please provide the bounding box coordinate of the region this sentence describes: {phrase}"
    raise ValueError(f"unknown box format {fmt!r}; expected one of {BOX_FORMATS}")


def parse_boxes(text: str, fmt: BoxFormat, input_size: tuple[int, int], label: str = "") -> list[ParsedBox]:
    """Read every box in a model answer, best (first mentioned) first.

    Unreadable answers give an empty list rather than an error: a model that fails to ground is a normal
    outcome the service reports, not a server fault.

    Args:
        text: The decoded answer.
        fmt: The family's box format.
        input_size: (width, height) in pixels of the image the model saw; only `qwen2_5_vl_json` needs it,
            because Qwen2.5-VL writes absolute pixels of its resized input (Qwen3-VL writes 0..1000).
        label: Label given to boxes whose format carries none (the phrase asked for, typically).

    Returns:
        Boxes normalised to the model input frame, clipped to [0, 1], corners ordered, degenerate ones dropped.
    """
    if fmt == "loc_tokens":
        raw = _parse_loc_tokens(text, label)
    elif fmt == "qwen2_5_vl_json":
        raw = _parse_qwen_json(text, input_size, label)
    elif fmt == "qwen3_vl_json":
        scale = QWEN3_RELATIVE_SCALE
        raw = _parse_qwen_json(text, (scale, scale), label)
    elif fmt == "llava_norm":
        raw = [(label, nums) for nums in _four_number_lists(text)]
    else:
        raise ValueError(f"unknown box format {fmt!r}; expected one of {BOX_FORMATS}")
    boxes = []
    for box_label, coords in raw:
        box = _clean_box(coords)
        if box is not None:
            boxes.append(ParsedBox(label=box_label, xyxy_norm=box))
    return boxes


def quantize(value: float, size: int, bins: int = LOC_BINS) -> int:
    """Florence-2 quantisation of one pixel coordinate: the bin that holds it, clamped to 0..bins-1.

    Args:
        value: Coordinate in pixels (an exclusive right/bottom edge equal to `size` lands in the last bin).
        size: Extent of that axis in pixels.
        bins: Number of bins.

    Returns:
        Bin index k; `dequantize(k)` gives the bin centre (k + 0.5) / bins.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    k = math.floor(value / size * bins)
    return min(max(k, 0), bins - 1)


def dequantize(k: int, bins: int = LOC_BINS) -> float:
    """Normalised centre of bin k, the inverse of `quantize` up to half a bin."""
    return (k + 0.5) / bins


def loc_tokens_for_box(box_xyxy_px: tuple[float, float, float, float], size_wh: tuple[int, int]) -> str:
    """The training target for a box: four location tokens, x1 y1 x2 y2.

    Args:
        box_xyxy_px: (x1, y1, x2, y2) in pixels of an image of `size_wh`.
        size_wh: (width, height) of that image.

    Returns:
        e.g. "<loc_100><loc_250><loc_400><loc_500>".
    """
    width, height = size_wh
    x1, y1, x2, y2 = box_xyxy_px
    ks = (quantize(x1, width), quantize(y1, height), quantize(x2, width), quantize(y2, height))
    return "".join(f"<loc_{k}>" for k in ks)


@dataclass(frozen=True)
class Frame:
    """Where an original image sits inside the model input, per axis: input = original * scale + offset.

    The one description of "model-input box -> original pixels" (and back) used by the adapters, the runner, the
    service, training and the tests. Coordinates are continuous pixel-edge coordinates (a box's right edge of an
    image of width W is W), which is what PIL's resize maps linearly, so the mapping is exact, not off by half a
    pixel. Each axis has its own scale: a resize rounds each side on its own, so one scale for both axes maps the
    short side of a very wide or tall image slightly wrong.

    Attributes:
        original_size: (width, height) of the original (upright) image in pixels.
        input_size: (width, height) of the image the vision encoder sees, in pixels.
        scale: (sx, sy): model-input pixels per original pixel on each axis.
        offset: (ox, oy): where the original's top-left corner lands in the model input (its padding), in pixels.
    """

    original_size: tuple[int, int]
    input_size: tuple[int, int]
    scale: tuple[float, float]
    offset: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def resize(cls, original_size: tuple[int, int], input_size: tuple[int, int]) -> Frame:
        """A plain resize of the whole image to `input_size` (Qwen's smart resize, or a shrink)."""
        (width, height), (in_width, in_height) = original_size, input_size
        return cls(original_size, input_size, (in_width / width, in_height / height))

    @classmethod
    def pad_to_square(cls, original_size: tuple[int, int], side: int | None = None) -> Frame:
        """Centred padding to a square of side max(W, H) (integer offsets, as pasting does), then a resize to `side`.

        LLaVA-1.5's "pad" aspect mode (expand2square), then its processor's resize to the model input side.
        """
        width, height = original_size
        square = max(width, height)
        side = square if side is None else side
        factor = side / square
        pad_x, pad_y = (square - width) // 2, (square - height) // 2
        return cls(original_size, (side, side), (factor, factor), (pad_x * factor, pad_y * factor))

    def then(self, after: Frame) -> Frame:
        """This frame followed by `after` (whose original is this frame's input): original -> `after`'s input."""
        if after.original_size != self.input_size:
            raise ValueError(
                f"cannot chain a frame into {self.input_size} with one from {after.original_size}"
            )
        (sx, sy), (ox, oy) = self.scale, self.offset
        (ax, ay), (bx, by) = after.scale, after.offset
        return Frame(self.original_size, after.input_size, (sx * ax, sy * ay), (ox * ax + bx, oy * ay + by))

    def to_input_norm(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A box in original pixels -> the same box in 0..1 of the model input."""
        (sx, sy), (ox, oy), (width, height) = self.scale, self.offset, self.input_size
        x1, y1, x2, y2 = box
        return (
            (x1 * sx + ox) / width,
            (y1 * sy + oy) / height,
            (x2 * sx + ox) / width,
            (y2 * sy + oy) / height,
        )

    def to_original(self, box_norm: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A box in 0..1 of the model input -> original pixels, NOT clipped (see `clip`)."""
        (sx, sy), (ox, oy), (width, height) = self.scale, self.offset, self.input_size
        u1, v1, u2, v2 = box_norm
        return (
            (u1 * width - ox) / sx,
            (v1 * height - oy) / sy,
            (u2 * width - ox) / sx,
            (v2 * height - oy) / sy,
        )

    def clip(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A box in original pixels limited to the image (a box reaching into the padding has no pixels there)."""
        width, height = self.original_size
        x1, y1, x2, y2 = box
        return (
            min(max(x1, 0.0), float(width)),
            min(max(y1, 0.0), float(height)),
            min(max(x2, 0.0), float(width)),
            min(max(y2, 0.0), float(height)),
        )


def _parse_loc_tokens(text: str, label: str) -> list[tuple[str, tuple[float, ...]]]:
    boxes = []
    for match in _LOC_GROUP_RE.finditer(text):
        ks = [int(g) for g in match.groups()]
        if any(k >= LOC_BINS for k in ks):
            continue
        boxes.append((label, tuple(dequantize(k) for k in ks)))
    return boxes


def _parse_qwen_json(
    text: str, input_size: tuple[float, float], label: str
) -> list[tuple[str, tuple[float, ...]]]:
    """Qwen's JSON boxes divided by `input_size` (its resized input in pixels, or 1000 x 1000 for Qwen3-VL)."""
    width, height = input_size
    if width <= 0 or height <= 0:
        raise ValueError(f"input_size must be positive (width, height), got {input_size}")
    pixel_boxes = _qwen_json_boxes(text, label)
    if pixel_boxes is None:  # not JSON at all: read whatever bbox_2d-like pieces are there
        pixel_boxes = [
            (m.group(5) or label, tuple(float(g) for g in m.groups()[:4])) for m in _BBOX_2D_RE.finditer(text)
        ]
        if not pixel_boxes:
            pixel_boxes = [(label, nums) for nums in _four_number_lists(text)]
    return [
        (box_label, (c[0] / width, c[1] / height, c[2] / width, c[3] / height))
        for box_label, c in pixel_boxes
    ]


def _qwen_json_boxes(text: str, label: str) -> list[tuple[str, tuple[float, ...]]] | None:
    """Boxes from the first decodable JSON value in the answer, or None when no JSON decodes."""
    fenced = _FENCE_RE.search(text)
    candidates = [fenced.group(1)] if fenced else []
    candidates.append(text)
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for start, char in enumerate(candidate):
            if char not in "[{":
                continue
            try:
                value, _ = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError:
                continue
            boxes = _boxes_from_json(value, label)
            if boxes:
                return boxes
    return None


def _boxes_from_json(value: Any, label: str) -> list[tuple[str, tuple[float, ...]]]:
    items = value if isinstance(value, list) else [value]
    boxes = []
    for item in items:
        if not isinstance(item, dict):
            continue
        coords = item.get("bbox_2d", item.get("bbox"))
        if not (isinstance(coords, list) and len(coords) == 4):
            continue
        if not all(isinstance(c, int | float) and not isinstance(c, bool) for c in coords):
            continue
        item_label = item.get("label")
        boxes.append((item_label if isinstance(item_label, str) else label, tuple(float(c) for c in coords)))
    return boxes


def _four_number_lists(text: str) -> list[tuple[float, ...]]:
    return [tuple(float(g) for g in m.groups()) for m in _FOUR_NUMBERS_RE.finditer(text)]


def _clean_box(coords: tuple[float, ...]) -> tuple[float, float, float, float] | None:
    if len(coords) != 4 or not all(math.isfinite(c) for c in coords):
        return None
    x1, y1, x2, y2 = (min(max(c, 0.0), 1.0) for c in coords)
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    if x2 - x1 < _MIN_SIDE or y2 - y1 < _MIN_SIDE:
        return None
    return (x1, y1, x2, y2)


__all__ = [
    "BOX_FORMATS",
    "LOC_BINS",
    "QWEN3_RELATIVE_SCALE",
    "BoxFormat",
    "Frame",
    "ParsedBox",
    "dequantize",
    "grounding_prompt",
    "loc_tokens_for_box",
    "parse_boxes",
    "quantize",
]

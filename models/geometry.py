"""Image geometry of a model family from the image size alone: its `Frame`, its visual-token count, its decode size.

Why a torch-free module: the API process must admit or refuse a request (queue measured in visual tokens, prompt
length, unreachable budgets) and map boxes BEFORE any pixel is decoded and without loading torch or transformers.
The worker's adapter owns one geometry object (`VisionLanguageAdapter.geometry`), uses it to frame images, and
sends it to the API process in `WorkerReady`, so both processes compute the same numbers with the same code.
`tests/models/test_frames.py` checks every geometry against what the stock processor really produced.

Two shapes cover the supported families:

* `PaddedSquareGeometry` (LLaVA-1.5): shrink very large images (long side above `shrink_limit`), pad to a centred
  square, resize to a fixed `input_side`; the token grid is fixed.
* `SmartResizeGeometry` (Qwen2.5-VL, Qwen3-VL): resize so both sides are multiples of patch x merge and the pixel
  count is within [min_pixels, max_pixels] (the processor's `smart_resize`); one token per merged patch group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.boxes import Frame


@dataclass(frozen=True)
class PaddedSquareGeometry:
    """LLaVA-1.5's "pad" aspect mode in front of a fixed-size vision tower.

    Attributes:
        input_side: Side of the square the vision tower sees, in pixels.
        grid: (rows, cols) of the visual-token grid (one token per patch).
        shrink_limit: Longest side kept before padding; larger images are shrunk first, each side rounded on its
            own, so a 20000 x 1 image never becomes a 20000 x 20000 canvas.
    """

    input_side: int
    grid: tuple[int, int]
    shrink_limit: int
    resample: str = "bilinear"
    """The filter of the shrink (what a decoder that reduces an image must resize it with)."""

    def shrink_size(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """The size a very large image is shrunk to before padding, or None when it is not shrunk."""
        width, height = image_size
        if max(width, height) <= self.shrink_limit:
            return None
        factor = self.shrink_limit / max(width, height)
        return max(1, round(width * factor)), max(1, round(height * factor))

    def frame(self, image_size: tuple[int, int]) -> Frame:
        """Shrink (very large images only), centred padding to a square, resize to `input_side`."""
        shrunk = self.shrink_size(image_size)
        if shrunk is None:
            return Frame.pad_to_square(image_size, self.input_side)
        return Frame.resize(image_size, shrunk).then(Frame.pad_to_square(shrunk, self.input_side))

    def visual_tokens(self, image_size: tuple[int, int]) -> int:
        """Every image becomes the full grid."""
        rows, cols = self.grid
        return rows * cols

    def decode_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The largest resolution the adapter reads from the original (what a decoder must keep)."""
        return self.shrink_size(image_size) or image_size


@dataclass(frozen=True)
class SmartResizeGeometry:
    """Dynamic resolution: sides rounded to multiples of `patch_size * merge_size`, pixels within the bounds.

    Attributes:
        patch_size: Vision patch side in pixels (14 for Qwen2.5-VL, 16 for Qwen3-VL).
        merge_size: Patches merged per side into one LLM token (2).
        min_pixels: Fewest pixels after the resize (the processor's `size["shortest_edge"]`).
        max_pixels: Most pixels after the resize (the processor's `size["longest_edge"]`).
        max_aspect_ratio: The processor refuses images whose long/short side ratio exceeds this.
    """

    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    max_aspect_ratio: float = 200.0
    resample: str = "bicubic"
    """The processor's resize filter (what a decoder that reduces an image must resize it with)."""

    @property
    def factor(self) -> int:
        """Side of the pixel square that becomes one LLM token."""
        return self.patch_size * self.merge_size

    def input_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) after the resize, exactly as the processor's `smart_resize` computes it.

        Raises:
            ValueError: The aspect ratio is above `max_aspect_ratio` (the processor refuses such images).
        """
        width, height = image_size
        if max(height, width) / min(height, width) > self.max_aspect_ratio:
            raise ValueError(
                f"absolute aspect ratio must be smaller than {self.max_aspect_ratio:g}, "
                f"got {max(height, width) / min(height, width)}"
            )
        factor = self.factor
        h_bar = round(height / factor) * factor
        w_bar = round(width / factor) * factor
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt((height * width) / self.max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return w_bar, h_bar

    def frame(self, image_size: tuple[int, int]) -> Frame:
        return Frame.resize(image_size, self.input_size(image_size))

    def visual_tokens(self, image_size: tuple[int, int]) -> int:
        width, height = self.input_size(image_size)
        return (width // self.factor) * (height // self.factor)

    def decode_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The processor resizes the original straight to the input size, so that is all a decoder must keep."""
        return self.input_size(image_size)


Geometry = PaddedSquareGeometry | SmartResizeGeometry
"""Any family's geometry (each has `frame`, `visual_tokens` and `decode_size`)."""

__all__ = ["Geometry", "PaddedSquareGeometry", "SmartResizeGeometry"]

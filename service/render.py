"""`?render=png`: the input image with the kept visual tokens shaded and the boxes drawn.

For people who would rather look than read: cells fed to the LLM (stage 1) get a light tint, cells kept to the
end (stage 2) a stronger one, everything pruned stays as it was; boxes are outlined on top with their label.
A cell of the token grid is a box on the model input; the result's `Frame` (how the model framed the image) maps
it to original pixels, so the overlay lines up with the picture whatever the resize or padding was.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw

from models.boxes import Frame

STAGE1_TINT = (0, 170, 255, 70)
STAGE2_TINT = (0, 120, 255, 120)
BOX_COLOUR = (255, 0, 160)


def cell_boxes(
    frame: Frame, grid: tuple[int, int], cells: Sequence[tuple[int, int]]
) -> list[tuple[tuple[int, int], tuple[float, float, float, float]]]:
    """Each (row, col) cell of the visual-token grid over the model input, as a box in original pixels (clipped)."""
    rows, cols = grid
    return [
        (
            (row, col),
            frame.clip(frame.to_original((col / cols, row / rows, (col + 1) / cols, (row + 1) / rows))),
        )
        for row, col in cells
    ]


def render_overlay(
    image: Image.Image,
    boxes: Sequence[tuple[str, Sequence[float]]],
    frame: Frame,
    grid: tuple[int, int],
    kept_stage1: Sequence[tuple[int, int]],
    kept_stage2: Sequence[tuple[int, int]],
    scale: float = 1.0,
) -> bytes:
    """Draw the overlay and encode it as PNG.

    Args:
        image: The upright RGB input image (possibly scaled down by `scale`).
        boxes: (label, [x1, y1, x2, y2] original pixels), best first.
        frame: Where the image sat in the model input.
        grid: (rows, cols) of the visual-token grid.
        kept_stage1: (row, col) of each cell fed to the LLM.
        kept_stage2: (row, col) of the cells kept after stage 2 (a subset of `kept_stage1`).
        scale: `image`'s pixels per original pixel (below 1 when a large input was scaled down for the overlay).

    Returns:
        PNG bytes of an image of the same size as `image`.
    """
    base = image.convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    final = {tuple(cell) for cell in kept_stage2}
    for cell, box in cell_boxes(frame, grid, kept_stage1):
        x1, y1, x2, y2 = (value * scale for value in box)
        if x2 - x1 < 1e-6 or y2 - y1 < 1e-6:
            continue  # a cell of the padding: nothing of the original image lies under it
        tint = STAGE2_TINT if tuple(cell) in final else STAGE1_TINT
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), fill=tint, outline=(0, 90, 200, 150))
    composed = Image.alpha_composite(base, overlay)
    draw = ImageDraw.Draw(composed)
    width = max(2, round(max(base.size) / 150))
    for index, (label, box) in enumerate(boxes):
        x1, y1, x2, y2 = (value * scale for value in box)
        draw.rectangle(
            (x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=BOX_COLOUR, width=width if index == 0 else 1
        )
        if label:
            text_y = y1 - 12 if y1 >= 12 else y2 + 2
            draw.text((x1 + 2, text_y), label, fill=BOX_COLOUR)
    buffer = io.BytesIO()
    composed.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = ["cell_boxes", "render_overlay"]

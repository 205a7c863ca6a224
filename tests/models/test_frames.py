"""One `Frame` maps boxes between original pixels and the model input, exactly, for both families.

Extreme sizes (4000x300, 300x4000, 1x1, 20000x1) are where a shared scale or a rounded offset would show: every
round trip must be exact on both axes with NO clipping, and the frame must say where the adapter really put the
image (checked against the pixels `prepare` produced for LLaVA, and against the processor's grid for Qwen).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.boxes import Frame
from models.llava import LlavaAdapter, expand_to_square
from models.qwen2_5_vl import Qwen2_5_VLAdapter
from tests.models.tiny import tiny_llava, tiny_qwen

torch.set_num_threads(1)

SIZES = [(4000, 300), (300, 4000), (1, 1), (20000, 1)]


@pytest.fixture(scope="module")
def llava() -> LlavaAdapter:
    return LlavaAdapter(*tiny_llava())


@pytest.fixture(scope="module")
def qwen() -> Qwen2_5_VLAdapter:
    return Qwen2_5_VLAdapter(*tiny_qwen())


def _boxes(size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """The whole image, its corners, and an off-centre box, in original pixels."""
    width, height = size
    return [
        (0.0, 0.0, float(width), float(height)),
        (0.0, 0.0, width / 3, height / 7),
        (width * 0.61, height * 0.27, width * 0.97, height * 0.83),
    ]


def _assert_round_trips(frame: Frame) -> None:
    for box in _boxes(frame.original_size):
        norm = frame.to_input_norm(box)
        back = frame.to_original(norm)
        assert back == pytest.approx(box, rel=1e-12, abs=1e-9), (frame, box, back)
        assert frame.to_input_norm(back) == pytest.approx(norm, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("size", SIZES)
def test_llava_round_trip_and_where_the_image_lands(llava: LlavaAdapter, size: tuple[int, int]) -> None:
    frame = llava.frame_for(size)
    side = llava.input_side
    assert frame.original_size == size and frame.input_size == (side, side)
    _assert_round_trips(frame)

    # Independently: shrink as the adapter does (long side at most 2 x side, each side rounded on its own),
    # pad with expand_to_square's integer offsets, resize the square to `side`.
    width, height = size
    limit = 2 * side
    if max(width, height) > limit:
        factor = limit / max(width, height)
        shrunk = (max(1, round(width * factor)), max(1, round(height * factor)))
    else:
        shrunk = size
    square = max(shrunk)
    _, (pad_x, pad_y) = expand_to_square(Image.new("RGB", shrunk), (0, 0, 0))
    expected = (pad_x / square, pad_y / square, (pad_x + shrunk[0]) / square, (pad_y + shrunk[1]) / square)
    assert frame.to_input_norm((0.0, 0.0, float(width), float(height))) == pytest.approx(expected, abs=1e-12)
    if shrunk != size:  # the two axes really have different scales, and the frame keeps both
        assert frame.scale[0] == pytest.approx(shrunk[0] / width * side / square)
        assert frame.scale[1] == pytest.approx(shrunk[1] / height * side / square)

    batch = llava.prepare([Image.new("RGB", size, (200, 30, 30))], ["What color?"])
    assert batch.frames == [frame]


@pytest.mark.parametrize("size", [(4000, 300), (300, 4000)])
def test_llava_frame_matches_the_pixels_prepare_produced(llava: LlavaAdapter, size: tuple[int, int]) -> None:
    """A saturated image on the mean-colour padding: the frame's image region is where the input is not padding."""
    batch = llava.prepare([Image.new("RGB", size, (255, 0, 0))], ["What color?"])
    pixels = batch.inputs["pixel_values"][0]  # (3, side, side), normalised
    side = pixels.shape[-1]
    red = (pixels[0] > 1.0).numpy()  # the padding is the image mean, normalised to ~0
    rows, cols = np.nonzero(red)
    x1, y1, x2, y2 = batch.frames[0].to_input_norm((0.0, 0.0, float(size[0]), float(size[1])))
    assert cols.min() == pytest.approx(x1 * side, abs=1.0) and cols.max() + 1 == pytest.approx(
        x2 * side, abs=1.0
    )
    assert rows.min() == pytest.approx(y1 * side, abs=1.0) and rows.max() + 1 == pytest.approx(
        y2 * side, abs=1.0
    )


@pytest.mark.parametrize("size", SIZES)
def test_qwen_round_trip_and_processor_grid(qwen: Qwen2_5_VLAdapter, size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (30, 200, 30))
    if max(size) / min(size) > 200:  # Qwen's own processor refuses such images; the frame says so too
        with pytest.raises(ValueError, match="aspect ratio"):
            qwen.prepare([image], ["What color?"])
        with pytest.raises(ValueError, match="aspect ratio"):
            qwen.frame_for(size)
        return
    frame = qwen.frame_for(size)
    assert frame.offset == (0.0, 0.0)
    _assert_round_trips(frame)
    assert frame.to_input_norm((0.0, 0.0, float(size[0]), float(size[1]))) == pytest.approx((0, 0, 1, 1))
    batch = qwen.prepare([image], ["What color?"])
    _, grid_h, grid_w = batch.inputs["image_grid_thw"][0].tolist()
    assert frame.input_size == (grid_w * qwen.patch_size, grid_h * qwen.patch_size)
    assert batch.frames == [frame]


def test_frames_chain_and_clip() -> None:
    shrink = Frame.resize((1000, 10), (200, 2))
    pad = Frame.pad_to_square((200, 2), 100)
    chained = shrink.then(pad)
    assert chained.input_size == (100, 100)
    assert chained.scale == pytest.approx((0.1, 0.1))
    assert chained.offset == pytest.approx((0.0, 49.5))
    with pytest.raises(ValueError, match="chain"):
        pad.then(shrink)
    assert chained.clip((-5.0, -1.0, 1200.0, 11.0)) == (0.0, 0.0, 1000.0, 10.0)

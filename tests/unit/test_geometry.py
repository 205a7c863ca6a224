"""The torch-free geometry equals the processors' own arithmetic (the API process relies on it for admission)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from models.geometry import PaddedSquareGeometry, SmartResizeGeometry

QWEN = SmartResizeGeometry(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=12_845_056)
QWEN3 = SmartResizeGeometry(patch_size=16, merge_size=2, min_pixels=64 * 64, max_pixels=16_777_216)


@settings(max_examples=400, deadline=None)
@given(width=st.integers(1, 20000), height=st.integers(1, 20000), geometry=st.sampled_from([QWEN, QWEN3]))
def test_smart_resize_matches_transformers(width: int, height: int, geometry: SmartResizeGeometry) -> None:
    try:
        expected_h, expected_w = smart_resize(
            height,
            width,
            factor=geometry.factor,
            min_pixels=geometry.min_pixels,
            max_pixels=geometry.max_pixels,
        )
    except ValueError:
        with pytest.raises(ValueError, match="aspect ratio"):
            geometry.input_size((width, height))
        return
    assert geometry.input_size((width, height)) == (expected_w, expected_h)
    assert geometry.visual_tokens((width, height)) == (expected_w // geometry.factor) * (
        expected_h // geometry.factor
    )
    assert geometry.frame((width, height)).input_size == (expected_w, expected_h)


def test_padded_square_shrinks_only_large_images() -> None:
    geometry = PaddedSquareGeometry(input_side=336, grid=(12, 12), shrink_limit=672)
    assert geometry.shrink_size((672, 100)) is None
    assert geometry.shrink_size((4000, 300)) == (672, 50)
    assert geometry.decode_size((4000, 300)) == (672, 50)
    assert geometry.decode_size((640, 480)) == (640, 480)
    assert geometry.visual_tokens((1, 1)) == 144
    assert geometry.frame((640, 480)).input_size == (336, 336)

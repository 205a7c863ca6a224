"""The fast CLIP pixel path gives the stock processor's tensors bit for bit (`models.clip_pixels`).

Checked on the built-in checkpoint's processor (336 px, bicubic) and on a tiny LLaVA processor (112 px), for
squares already at the input size and squares that need the bicubic resize (smaller, larger, odd sides), and on
the adapter's whole `prepare` inputs (input ids, attention mask, pixel values) against the stock processor.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from models.builtin import BUILTIN_MODEL_DIR
from models.clip_pixels import ClipPixels
from models.llava import LlavaAdapter
from tests.models.tiny import tiny_llava, tiny_qwen


def _squares(sides: list[int], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for side in sides]


@pytest.fixture(scope="module")
def builtin_processor():
    return AutoProcessor.from_pretrained(BUILTIN_MODEL_DIR)


@pytest.mark.parametrize("sides", [[336, 336], [100, 700, 337, 336]])
def test_builtin_pixels_equal_the_stock_processor_exactly(builtin_processor, sides: list[int]) -> None:
    image_processor = builtin_processor.image_processor
    fast = ClipPixels.from_processor(image_processor)
    assert fast is not None and fast.side == 336
    images = _squares(sides)
    stock = torch.stack([image_processor([im], return_tensors="pt")["pixel_values"][0] for im in images])
    ours = fast(images)
    assert ours.dtype == stock.dtype == torch.float32
    assert ours.shape == stock.shape == (len(sides), 3, 336, 336)
    assert torch.equal(ours, stock)


def test_tiny_llava_pixels_equal_the_stock_processor_exactly() -> None:
    _, processor = tiny_llava(seed=0)
    fast = ClipPixels.from_processor(processor.image_processor)
    assert fast is not None and fast.side == 112
    images = _squares([112, 50, 300], seed=3)
    stock = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(fast(images), stock)


def test_settings_it_does_not_reproduce_keep_the_stock_processor(builtin_processor) -> None:
    no_crop = copy.deepcopy(builtin_processor.image_processor)
    no_crop.do_center_crop = False
    assert ClipPixels.from_processor(no_crop) is None
    no_normalise = copy.deepcopy(builtin_processor.image_processor)
    no_normalise.do_normalize = False
    assert ClipPixels.from_processor(no_normalise) is None
    _, qwen_processor = tiny_qwen(seed=0)
    assert ClipPixels.from_processor(qwen_processor.image_processor) is None


def test_non_square_input_is_refused(builtin_processor) -> None:
    fast = ClipPixels.from_processor(builtin_processor.image_processor)
    assert fast is not None
    with pytest.raises(ValueError, match="square RGB"):
        fast([Image.new("RGB", (300, 200))])


def test_adapter_inputs_equal_the_stock_processor_exactly() -> None:
    model, processor = tiny_llava(seed=0)
    adapter = LlavaAdapter(model, processor)
    assert adapter.clip_pixels is not None
    images = _squares([112, 90, 200], seed=5)
    texts = [adapter.format_prompt(p) for p in ("the red circle", "a blue square near the top left", "it")]
    ours = adapter.fast_inputs(images, texts)
    stock = processor(images=images, text=texts, padding=True, return_tensors="pt")
    assert ours is not None
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(ours[key], stock[key]), key
    image_tokens = (ours["input_ids"] == adapter.image_token_id).sum(dim=1)
    assert image_tokens.tolist() == [64, 64, 64]
    assert adapter.fast_inputs(images[:1], [texts[0] + " <image>"]) is None  # two image tokens: stock path

"""Box formats: prompts, parsers for each family, quantisation and the mapping back to original pixels."""

from __future__ import annotations

import random

import pytest

from models.boxes import (
    BOX_FORMATS,
    LOC_BINS,
    Frame,
    ParsedBox,
    dequantize,
    grounding_prompt,
    loc_tokens_for_box,
    parse_boxes,
    quantize,
)


def test_prompts_per_family() -> None:
    assert grounding_prompt("the red circle", "loc_tokens") == "Locate the red circle."
    assert grounding_prompt("a dog", "qwen2_5_vl_json") == (
        "Locate a dog in the image, output its bbox coordinates using JSON format."
    )
    assert grounding_prompt("a dog", "llava_norm") == (
        "Please provide the bounding box coordinate of the region this sentence describes: a dog"
    )
    with pytest.raises(ValueError, match="unknown box format"):
        grounding_prompt("a dog", "pixels")  # type: ignore[arg-type]


def test_quantize_edges_and_centres() -> None:
    assert quantize(0, 336) == 0
    assert quantize(336, 336) == LOC_BINS - 1  # exclusive right edge lands in the last bin
    assert quantize(-5, 336) == 0
    assert quantize(168, 336) == 500
    assert dequantize(0) == pytest.approx(0.0005)
    assert dequantize(999) == pytest.approx(0.9995)
    for k in range(0, LOC_BINS, 37):
        assert quantize(dequantize(k) * 448, 448) == k
    with pytest.raises(ValueError):
        quantize(1, 0)


def test_loc_tokens_text() -> None:
    assert loc_tokens_for_box((33.6, 84, 134.4, 336), (336, 336)) == "<loc_100><loc_250><loc_400><loc_999>"


@pytest.mark.parametrize("size", [(336, 336), (224, 224), (640, 480), (480, 640), (1000, 37), (301, 999)])
def test_loc_round_trip_through_padded_square(size: tuple[int, int]) -> None:
    """Original box -> padded square -> loc tokens -> parse -> original pixels, within one bin."""
    width, height = size
    side = max(width, height)
    frame = Frame.pad_to_square(size)
    pad_x, pad_y = frame.offset
    rng = random.Random(width * 7919 + height)
    bin_px = side / LOC_BINS
    for _ in range(200):
        x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
        if x2 - x1 < 2 * bin_px or y2 - y1 < 2 * bin_px:
            continue
        text = loc_tokens_for_box((x1 + pad_x, y1 + pad_y, x2 + pad_x, y2 + pad_y), (side, side))
        (parsed,) = parse_boxes(f" {text}</s>", "loc_tokens", (336, 336), label="obj")
        assert parsed.label == "obj"
        back = frame.clip(frame.to_original(parsed.xyxy_norm))
        for got, want in zip(back, (x1, y1, x2, y2), strict=True):
            assert abs(got - want) <= bin_px + 1e-9


def test_loc_tokens_tolerates_spaces_several_boxes_and_incomplete_groups() -> None:
    text = "<loc_100> <loc_200>\n<loc_300> <loc_400> and <loc_500><loc_600><loc_700><loc_800><loc_1><loc_2>"
    boxes = parse_boxes(text, "loc_tokens", (336, 336))
    assert [b.xyxy_norm for b in boxes] == [
        pytest.approx((0.1005, 0.2005, 0.3005, 0.4005)),
        pytest.approx((0.5005, 0.6005, 0.7005, 0.8005)),
    ]


def test_loc_tokens_fix_order_and_drop_degenerate() -> None:
    (box,) = parse_boxes("<loc_700><loc_800><loc_100><loc_200>", "loc_tokens", (336, 336))
    assert box.xyxy_norm == pytest.approx((0.1005, 0.2005, 0.7005, 0.8005))
    assert parse_boxes("<loc_100><loc_200><loc_100><loc_400>", "loc_tokens", (336, 336)) == []
    assert parse_boxes("<loc_100><loc_200><loc_1000><loc_400>", "loc_tokens", (336, 336)) == []


@pytest.mark.parametrize(
    "text",
    [
        '[{"bbox_2d": [64, 48, 320, 240], "label": "dog"}]',
        '```json\n[\n  {"bbox_2d": [64, 48, 320, 240], "label": "dog"}\n]\n```',
        'Sure! {"bbox_2d": [64, 48, 320, 240], "label": "dog"} is where it is.',
        '```json\n[{"bbox_2d": [64, 48, 320, 240], "label": "dog"}, {"bbox_2d": [1, 2, 3, 4]\n```',
        '[{"bbox_2d": [64, 48, 320, 240], "label": "dog"}, {"bbox_2d": [0, 0, 3',
    ],
)
def test_qwen_json_variants(text: str) -> None:
    boxes = parse_boxes(text, "qwen2_5_vl_json", (640, 480), label="phrase")
    assert boxes[0] == ParsedBox(label="dog", xyxy_norm=(0.1, 0.1, 0.5, 0.5))


def test_qwen_json_several_boxes_clip_and_default_label() -> None:
    text = '[{"bbox_2d": [320, 240, 700, 500]}, {"bbox_2d": [10, 10, 10, 50]}, {"bbox_2d": [0, 0, 64, 48]}]'
    boxes = parse_boxes(text, "qwen2_5_vl_json", (640, 480), label="cat")
    assert boxes == [
        ParsedBox(label="cat", xyxy_norm=(0.5, 0.5, 1.0, 1.0)),
        ParsedBox(label="cat", xyxy_norm=(0.0, 0.0, 0.1, 0.1)),
    ]


def test_qwen_boxes_map_to_original_pixels_after_plain_resize() -> None:
    # 1000x750 original smart-resized to 644x476; the model answers in the resized frame.
    (box,) = parse_boxes('{"bbox_2d": [161, 119, 483, 357]}', "qwen2_5_vl_json", (644, 476))
    assert Frame.resize((1000, 750), (644, 476)).to_original(box.xyxy_norm) == pytest.approx(
        (250.0, 187.5, 750.0, 562.5)
    )


def test_llava_norm_floats_and_padding_frame() -> None:
    boxes = parse_boxes("The box is [0.25, 0.30, 0.75, 0.80].", "llava_norm", (336, 336), label="x")
    assert boxes == [ParsedBox(label="x", xyxy_norm=(0.25, 0.3, 0.75, 0.8))]
    # 400x200 padded to a 400x400 square: 100 px of padding above and below.
    frame = Frame.pad_to_square((400, 200), 336)
    back = frame.clip(frame.to_original(boxes[0].xyxy_norm))
    assert back == pytest.approx((100.0, 20.0, 300.0, 200.0))  # y2 = 320 - 100 = 220 clipped to 200


def test_llava_norm_order_and_clip() -> None:
    (box,) = parse_boxes("[0.9, 0.8, -0.1, 0.2]", "llava_norm", (336, 336))
    assert box.xyxy_norm == pytest.approx((0.0, 0.2, 0.9, 0.8))


@pytest.mark.parametrize("fmt", BOX_FORMATS)
@pytest.mark.parametrize(
    "text",
    ["", "I cannot see that.", "<loc_1><loc_2>", "[1, 2, 3]", "{not json", "```json\n```", "[a, b, c, d]"],
)
def test_garbage_gives_no_boxes(fmt: str, text: str) -> None:
    assert parse_boxes(text, fmt, (336, 336)) == []  # type: ignore[arg-type]

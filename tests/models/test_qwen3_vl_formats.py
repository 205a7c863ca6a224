"""Qwen3-VL's grounding format (JSON `bbox_2d` in RELATIVE 0..1000 coordinates) and its token plans.

Pure Python: the parser and the planner are what the API process may import without torch.
"""

from __future__ import annotations

import pytest

from models.boxes import BOX_FORMATS, Frame, ParsedBox, grounding_prompt, parse_boxes
from models.budget import FAMILIES, FAMILY_MIN_TOP_N, PruningConfig, plan_tokens

FMT = "qwen3_vl_json"


def test_format_and_prompt() -> None:
    assert FMT in BOX_FORMATS
    assert (
        grounding_prompt("a dog", FMT) == "Locate a dog in the image. Report bbox coordinates in JSON format."
    )


@pytest.mark.parametrize("input_size", [(352, 160), (1024, 768), (32, 2048)])
def test_relative_coordinates_do_not_depend_on_the_input_size(input_size: tuple[int, int]) -> None:
    (box,) = parse_boxes('[{"bbox_2d": [100, 250, 500, 750], "label": "dog"}]', FMT, input_size, label="x")
    assert box == ParsedBox(label="dog", xyxy_norm=(0.1, 0.25, 0.5, 0.75))


def test_several_boxes_fences_prose_and_clamping() -> None:
    text = (
        "Sure! Here they are:\n```json\n[\n"
        '  {"bbox_2d": [0, 0, 1000, 1000], "label": "image"},\n'
        '  {"bbox_2d": [600, -20, 1016, 400]},\n'
        '  {"bbox_2d": [1200, 100, 1300, 200], "label": "outside"},\n'
        '  {"bbox_2d": [300, 300, 300, 500], "label": "flat"},\n'
        '  {"bbox_2d": [750, 900, 250, 100], "label": "swapped"}\n'
        "]\n```\nAnything else?"
    )
    boxes = parse_boxes(text, FMT, (640, 480), label="cat")
    assert boxes == [
        ParsedBox(label="image", xyxy_norm=(0.0, 0.0, 1.0, 1.0)),
        ParsedBox(label="cat", xyxy_norm=(0.6, 0.0, 1.0, 0.4)),  # 1016 -> 1000, -20 -> 0
        ParsedBox(label="swapped", xyxy_norm=(0.25, 0.1, 0.75, 0.9)),
    ]  # entirely beyond 1000 (zero width after clamping) and flat boxes are dropped


def test_single_object_and_truncated_answers() -> None:
    assert parse_boxes('{"bbox_2d": [10, 20, 30, 40]}', FMT, (1, 1)) == [
        ParsedBox(label="", xyxy_norm=(0.01, 0.02, 0.03, 0.04))
    ]
    # Generation cut off mid-list: no JSON decodes, the complete bbox_2d entries are still read.
    truncated = '```json\n[{"bbox_2d": [100, 100, 200, 200], "label": "a"}, {"bbox_2d": [300, 300, 4'
    assert parse_boxes(truncated, FMT, (1, 1)) == [ParsedBox(label="a", xyxy_norm=(0.1, 0.1, 0.2, 0.2))]
    assert parse_boxes("The dog is at [500, 500, 1000, 1000].", FMT, (1, 1), label="dog") == [
        ParsedBox(label="dog", xyxy_norm=(0.5, 0.5, 1.0, 1.0))
    ]
    assert parse_boxes("I cannot find it.", FMT, (1, 1)) == []


def test_boxes_map_to_original_pixels_through_the_smart_resize_frame() -> None:
    # 448 x 224 smart-resized to 352 x 160 (multiples of 32): each axis has its own scale.
    frame = Frame.resize((448, 224), (352, 160))
    (box,) = parse_boxes('{"bbox_2d": [250, 100, 750, 900]}', FMT, frame.input_size)
    assert frame.to_original(box.xyxy_norm) == pytest.approx((112.0, 22.4, 336.0, 201.6))


def test_family_is_planned_like_qwen2_5_vl() -> None:
    assert "qwen3_vl" in FAMILIES and FAMILY_MIN_TOP_N["qwen3_vl"] == 3
    # Qwen3-VL-8B: 36 LLM layers; a 1024 x 1024 image is 32 x 32 merged tokens of 32 px.
    for ratio, stage1, stage2, top_n in ((0.25, 358, 150, 3), (0.5, 614, 405, 3), (0.75, 870, 609, 4)):
        plan = plan_tokens(PruningConfig(budget=ratio), 1024, 36, (32, 32), family="qwen3_vl")
        reference = plan_tokens(PruningConfig(budget=ratio), 1024, 36, (32, 32), family="qwen2_5_vl")
        assert plan == reference
        assert (plan.stage1_tokens, plan.stage2_tokens, plan.stage2_layer, plan.top_n) == (
            stage1,
            stage2,
            18,
            top_n,
        )
    other = plan_tokens(PruningConfig(budget=0.4), 1024, 36, (32, 32), family="qwen3_vl")
    assert other.average == pytest.approx(0.4 * 1024, abs=1.0)
    assert (
        plan_tokens(PruningConfig(budget=64, method="fastv"), 1024, 36, (32, 32), "qwen3_vl").stage2_layer
        == 2
    )

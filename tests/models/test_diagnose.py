"""`models.diagnose`: failure classes of grounding answers and per-head target rates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.builtin import scenes
from models.builtin.build import TINY_OVERRIDES, build_builtin
from models.builtin.data import official_eval_examples, stage_eval_examples
from models.builtin.diagnose import (
    FAILURE_CLASSES,
    classify_box,
    grounding_failures,
    head_target_rates,
    heads_table,
    main,
)
from models.builtin.train import predicted_box

SCENE = scenes.Scene(
    336,
    (230, 230, 230),
    (
        scenes.SceneObject("red", "circle", (40, 40, 100, 100)),
        scenes.SceneObject("blue", "square", (200, 200, 260, 260)),
    ),
)
TARGET = SCENE.objects[0].box


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((40, 40, 100, 100), "correct"),
        ((42, 44, 104, 98), "correct"),
        ((40, 40, 70, 70), "right_object_imprecise"),  # IoU 0.25 with the target, still its best overlap
        ((198, 203, 262, 258), "wrong_object"),
        ((150, 10, 180, 30), "nowhere"),
        (None, "no_box"),
    ],
)
def test_classify_box(box: tuple[int, ...] | None, expected: str) -> None:
    assert classify_box(box, SCENE, TARGET) == expected


def test_predicted_box_reads_the_first_four_location_tokens() -> None:
    """The diagnosis reads boxes with the evaluation's parser (`train.predicted_box`), so their "correct" agree."""
    assert predicted_box("<loc_0><loc_250><loc_999><loc_500><loc_7>", 1000) == pytest.approx(
        (0.5, 250.5, 999.5, 500.5)
    )
    assert predicted_box("<loc_1><loc_2><loc_3>", 336) is None
    assert predicted_box("red", 336) is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, object]:
    out = tmp_path_factory.mktemp("tiny_diagnose")
    torch.manual_seed(0)
    model, processor = build_builtin(out, TINY_OVERRIDES, seed=0)
    return out, model.eval(), processor


def test_head_rates_are_one_on_one_object_scenes_and_shares_elsewhere(tiny: tuple) -> None:
    _, model, processor = tiny
    single = [e for e in stage_eval_examples("single", 8) if e.box is not None]
    rates = head_target_rates(model, processor, single, batch_size=3)
    layers = model.config.text_config.num_hidden_layers
    heads = model.config.text_config.num_attention_heads
    assert rates.items == len(single) and rates.target_hits.shape == (layers, heads)
    assert torch.equal(
        rates.target_hits, torch.ones(layers, heads)
    )  # the only object is always the named one
    assert ((rates.image_mass > 0) & (rates.image_mass <= 1 + 1e-5)).all()
    several = [e for e in official_eval_examples(12) if e.box is not None and len(e.scene.objects) > 1]
    mixed = head_target_rates(model, processor, several, batch_size=5)
    assert ((mixed.target_hits >= 0) & (mixed.target_hits <= 1)).all() and mixed.target_hits.mean() < 1
    assert heads_table(mixed).count("\n") == layers + 1
    assert model.config._attn_implementation != "eager"  # restored after the measurement


def test_grounding_failures_count_every_item_once(tiny: tuple) -> None:
    _, model, processor = tiny
    items = [e for e in official_eval_examples(6) if e.box is not None]
    counts = grounding_failures(model, processor, items, batch_size=4)
    assert sum(counts["all"].values()) == len(items)
    assert set(counts["all"]) <= set(FAILURE_CLASSES)
    assert sum(sum(c.values()) for kind, c in counts.items() if kind != "all") == len(items)


def test_cli_prints_both_tables(tiny: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    out, _, _ = tiny
    main(["--model", str(out), "--limit", "4"])
    printed = capsys.readouterr().out
    assert "| all | 4 |" in printed and "| layer | head 0 |" in printed

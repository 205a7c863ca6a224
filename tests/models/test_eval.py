"""The retention study CLI on a saved tiny checkpoint: scene items, JSONL items, table, verdict and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import eval as retention
from models.builtin import scenes
from tests.models.tiny import save_tiny_llava
from tests.support.eval_items import write_scene_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


def test_study_on_scenes_writes_table_and_plot(model_dir, tmp_path):
    out = tmp_path / "RETENTION.md"
    retention.main(
        [
            "--model",
            str(model_dir),
            "--limit",
            "3",
            "--methods",
            "nuwa",
            "fastv",
            "--budgets",
            "0.25",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    text = out.read_text()
    assert "| none | 100% | paper | 64.0 |" in text
    assert "| nuwa | 25% |" in text and "| fastv | 25% |" in text
    assert "### Verdict" in text
    assert (tmp_path / "retention.png").stat().st_size > 10_000
    # the per-kind table: every kind of the 3 + 3 items, unpruned and each method at the budget
    assert "| kind | items | none | nuwa 25% | fastv 25% |" in text
    for kind in (
        "ground/color_shape",
        "ground/shape",
        "ground/color_object",
        "vqa/color",
        "vqa/shape",
        "vqa/count",
    ):
        assert f"| {kind} | 1 |" in text


def test_jsonl_items_and_scoring(tmp_path):
    grounding, vqa = scenes.evaluation_set(num_grounding=2, num_vqa=2)
    path, lines = write_scene_jsonl(tmp_path, grounding, vqa)
    items = retention.jsonl_items(path, limit=1)
    assert [item.kind for item in items] == ["ground", "vqa"]
    assert items[0].box == tuple(map(float, grounding[0].box)) and items[1].answer == vqa[0].answer
    assert items[0].subkind is None
    tagged = tmp_path / "tagged.jsonl"
    tagged.write_text(json.dumps({**lines[0], "kind": "ground/testA"}))
    assert retention.jsonl_items(tagged)[0].subkind == "ground/testA"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"type": "caption", "image": "g0.png"}))
    with pytest.raises(ValueError, match="type must be"):
        retention.jsonl_items(bad)


def test_verdict_reads_the_numbers():
    reference = retention.Score("none", "none", None, 9, 10, 9, 10)
    nuwa = retention.Score("nuwa", "nuwa", 0.25, 5, 10, 9, 10)
    fastv = retention.Score("fastv", "fastv", 0.25, 1, 10, 9, 10)
    text = retention.verdict([reference, nuwa, fastv])
    assert "Nüwa keeps 55.6% of unpruned grounding" in text and "SHOWS" in text
    assert "does NOT show" in retention.verdict(
        [reference, fastv, retention.Score("nuwa", "nuwa", 0.25, 0, 10, 9, 10)]
    )


def test_scores_per_kind_and_the_kind_table():
    image = scenes.render(scenes.evaluation_set(1, 0)[0][0].scene)
    extremal = retention.EvalItem(
        "ground", image, "the leftmost circle", box=(0, 0, 1, 1), subkind="ground/extremal"
    )
    count = retention.EvalItem("vqa", image, "How many circles are there?", answer="2", subkind="vqa/count")
    reference = retention.Score("none", "none", None)
    for item, correct in ((extremal, True), (extremal, False), (count, True), (count, True)):
        reference.add(item, correct)
    assert (reference.grounding, reference.vqa) == (0.5, 1.0)
    assert reference.by_kind == {"ground/extremal": [1, 2], "vqa/count": [2, 2]}
    pruned = retention.Score("nuwa@0.25", "nuwa", 0.25)
    pruned.add(count, False)
    wider = retention.Score("nuwa@0.5", "nuwa", 0.5)
    table = retention.kind_table([reference, pruned, wider])
    assert table.splitlines()[0] == "| kind | items | none | nuwa 25% |"  # only the smallest budget is shown
    assert "| ground/extremal | 2 | 0.500 | n/a |" in table and "| vqa/count | 2 | 1.000 | 0.000 |" in table
    assert retention.kind_table([retention.Score("none", "none", None)]) == ""


def test_stage_items_are_held_out_one_object_scenes() -> None:
    items = retention.stage_items("single", 4)
    assert [item.kind for item in items] == ["ground"] * 4 + ["vqa"] * 4
    for item in items[:4]:
        words = item.text.split()
        assert words[0] == "the" and words[1] in scenes.COLORS and words[2] in scenes.SHAPES
        x1, y1, x2, y2 = item.box
        assert 0 <= x1 < x2 <= item.image.width and 0 <= y1 < y2 <= item.image.height
        pixels = np.asarray(item.image)[int(y1) : int(y2), int(x1) : int(x2)].reshape(-1, 3)
        assert (pixels == scenes.COLORS[words[1]]).all(axis=1).any()  # the named colour is inside the box
    assert all(item.answer in {*scenes.COLORS, *scenes.SHAPES} for item in items[4:])
    assert retention.stage_items("single", 4)[0].box == items[0].box  # seeded: the same items every time


def _score(
    method: str, budget: float | None, grounding: int, vqa: int, flops: float = 1e9
) -> retention.Score:
    score = retention.Score(
        method if budget is None else f"{method}@{budget}", method, budget, grounding, 100, vqa, 100
    )
    score.flops = [flops]
    return score


def test_the_targets_table_reads_calibrated_against_the_paper_split() -> None:
    scores = [
        _score("none", None, 100, 100),
        _score("nuwa", 0.25, 71, 86, flops=0.9e9),
        _score("nuwa_paper", 0.25, 49, 75),
        _score("nuwa", 0.5, 96, 94),
        _score("nuwa_paper", 0.5, 84, 89),
    ]
    lines = retention.targets_table(scores).splitlines()
    assert lines[2] == "| 25% | 71.0% | >= 70% | 86.0% | >= 85% | 0.900 / 1.000 | yes |"
    assert lines[3] == "| 50% | 96.0% | >= 95% | 94.0% | >= 95% | 1.000 / 1.000 | NO |"  # VQA short of 95%
    scores[1].flops = [1.1e9]  # more FLOPs than the paper's split fails the target whatever the accuracy
    assert retention.targets_table(scores).splitlines()[2].endswith("| NO |")
    assert retention.targets_table(scores[:1]) == ""


def test_report_with_two_sets_plans_and_kept_notes(tmp_path) -> None:
    from models.plans import CalibratedPlan, CalibrationShape, PlanTable, default_plan_fields

    scores = [
        _score("none", None, 100, 100),
        _score("nuwa", 0.25, 71, 86),
        _score("nuwa_paper", 0.25, 49, 75),
    ]
    out = tmp_path / "RETENTION.md"
    out.write_text("old\n<!-- notes -->\nWhat the calibration found, by hand.\n<!-- /notes -->\nold tail\n")
    plan = CalibratedPlan(
        "ground",
        0.25,
        {**default_plan_fields(), "stage1_fraction": 0.5, "stage2_ratio": 0.2, "stage2_layer": 3, "top_n": 2},
        (72, 72, 72, 14, 14, 14, 14, 14),
        {
            "calibrated": 0.61,
            "paper": 0.39,
            "unpruned": 0.98,
            "items": 256,
            "paper_per_layer": [63] * 4 + [9] * 4,
        },
    )
    table = PlanTable([plan], CalibrationShape(144, 8, (12, 12), "llava"), {"data": "split", "seconds": 60})
    sets = [
        retention.EvalSet("evaluation set", 200, scores, tmp_path / "retention.png"),
        retention.EvalSet("contract", 80, scores, tmp_path / "retention_2.png"),
    ]
    retention.write_report(sets, out, "python -m models.eval", "tiny", 1.0, table)
    text = out.read_text()
    assert "old tail" not in text and text.count("What the calibration found, by hand.") == 1
    assert "## evaluation set (200 items)" in text and "## contract (80 items)" in text
    assert text.count("| 25% | 71.0% | >= 70% | 86.0% | >= 85% |") == 2
    assert "## Calibrated plans" in text
    assert (
        "| `calibrated:ground@0.25` | 72 -> 14 at layer 3 | 63 -> 9 at layer 4 | region 2x2, top-n 2 | "
        "0.610 / 0.390 / 0.980 (256 items) |" in text
    )
    assert "The paper's split (nuwa_paper) keeps 49.0% of grounding" in text


def test_study_scores_each_extra_set_on_its_own(model_dir, tmp_path):
    grounding, vqa = scenes.evaluation_set(num_grounding=1, num_vqa=1, seed=7)
    extra, lines = write_scene_jsonl(tmp_path / "contract", grounding, vqa)
    extra.write_text("\n".join(json.dumps({**line, "kind": f"{line['type']}/x"}) for line in lines))
    out = tmp_path / "RETENTION.md"
    argv = ["--model", str(model_dir), "--limit", "1", "--methods", "nuwa", "nuwa_paper", "--budgets", "0.25"]
    retention.main([*argv, "--also-data", str(extra), "--out", str(out), "--device", "cpu"])
    text = out.read_text()
    assert "## evaluation set (2 items)" in text and f"## {extra} (2 items)" in text
    assert text.count("| nuwa_paper | 25% | paper |") == 2
    assert "| vqa/x | 1 |" in text and "| ground/x | 1 |" in text  # the extra set's own kinds
    assert (tmp_path / "retention.png").is_file() and (tmp_path / "retention_2.png").is_file()

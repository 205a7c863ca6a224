"""The retention study CLI on a saved tiny checkpoint: scene items, JSONL items, table, verdict and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import eval as retention
from models.builtin import scenes
from tests.models.tiny import tiny_llava

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llava")
    model, processor = tiny_llava()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


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
    assert "| none | 100% | 64.0 |" in text
    assert "| nuwa | 25% |" in text and "| fastv | 25% |" in text
    assert "## Verdict" in text
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
    lines = []
    for i, item in enumerate(grounding):
        scenes.render(item.scene).save(tmp_path / f"g{i}.png")
        lines.append({"type": "ground", "image": f"g{i}.png", "phrase": item.phrase, "box": list(item.box)})
    for i, item in enumerate(vqa):
        scenes.render(item.scene).save(tmp_path / f"v{i}.png")
        lines.append({"type": "vqa", "image": f"v{i}.png", "question": item.question, "answer": item.answer})
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
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

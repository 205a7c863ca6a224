"""The independent contract generator (`bench/contract_scenes.py`) and `models/builtin/scenes.py` must agree.

They were written apart from `shared/specs/scenes.md`; where both follow the spec, every item of one is a valid item
of the other, and the two rasterisers differ only at shape edges.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bench import contract_scenes as independent
from models.builtin import scenes
from models.eval import jsonl_items

SIZE = 336


@pytest.fixture(scope="module")
def items() -> list[independent.Item]:
    return independent.generate(seed=7, per_kind=12, size=SIZE)


def _scene(item: independent.Item) -> scenes.Scene:
    objects = tuple(scenes.SceneObject(t.colour, t.shape, t.box) for t in item.things)
    return scenes.Scene(SIZE, item.background, objects)


def test_constants_are_the_spec_s() -> None:
    assert independent.COLOURS == scenes.COLORS
    assert set(independent.SHAPES) == set(scenes.SHAPES)
    assert set(independent.EXTREMES) == set(scenes.EXTREMES)


def test_every_kind_is_balanced(items: list[independent.Item]) -> None:
    kinds = Counter(item.kind for item in items)
    expected = [f"ground/{k}" for k in scenes.PHRASE_KINDS] + [f"vqa/{k}" for k in scenes.QUESTION_KINDS]
    assert kinds == dict.fromkeys(expected, 12)
    counts = Counter(item.answer for item in items if item.kind == "vqa/count")
    assert counts == dict.fromkeys("012345", 2)
    assert Counter(item.answer for item in items if item.kind == "vqa/exists") == {"yes": 6, "no": 6}


def test_scenes_follow_the_geometry_rules_of_models_scenes(items: list[independent.Item]) -> None:
    low, high = scenes.side_range(SIZE)
    darkest, lightest = scenes.BACKGROUND_RANGE
    for item in items:
        scene = _scene(item)  # raises when a box is outside the image or not square
        assert 1 <= len(scene.objects) <= scenes.MAX_OBJECTS
        assert all(low <= o.side <= high for o in scene.objects)
        assert all(scenes.boxes_separated(a.box, b.box) for a, b in itertools.combinations(scene.objects, 2))
        assert all(darkest <= channel <= lightest for channel in item.background)


def test_every_item_is_valid_for_models_scenes(items: list[independent.Item]) -> None:
    for item in items:
        scene = _scene(item)
        if item.box is not None:
            target = next(i for i, t in enumerate(item.things) if t.box == item.box)
            assert (item.text, target) in scenes.grounding_phrases(scene), item
        elif item.kind == "vqa/exists" and item.answer == "no":
            colour, shape = item.text.removeprefix("Is there a ").removesuffix("?").split()
            assert all((o.color, o.shape) != (colour, shape) for o in scene.objects)
        else:
            valid = {(q.question, q.answer) for q in scenes.vqa_questions(scene, random.Random(0))}
            assert (item.text, item.answer) in valid, item


def test_both_rasterisers_draw_the_same_objects(items: list[independent.Item]) -> None:
    for item in items[:: len(items) // 16]:
        theirs = np.asarray(independent.draw(item.things, item.background, SIZE)).astype(int)
        ours = np.asarray(scenes.render(_scene(item))).astype(int)
        palette = {tuple(c) for c in scenes.COLORS.values()} | {item.background}
        assert {tuple(p) for p in theirs.reshape(-1, 3)} <= palette  # exact colours, no antialiasing
        outside = np.ones((SIZE, SIZE), dtype=bool)
        for thing in item.things:
            x1, y1, x2, y2 = thing.box
            outside[y1:y2, x1:x2] = False
            mine = (ours[y1:y2, x1:x2] != item.background).any(-1)
            other = (theirs[y1:y2, x1:x2] == scenes.COLORS[thing.colour]).all(-1)
            agreement = (mine == other).mean()
            assert agreement >= 0.9, (thing, agreement)  # they differ at the edges only
        assert (theirs[outside] == item.background).all()  # nothing drawn outside the boxes


def test_written_items_load_in_the_eval_format(tmp_path: Path) -> None:
    few = independent.generate(seed=3, per_kind=1, size=SIZE)
    path = independent.write(few, tmp_path, SIZE)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["kind"] for r in records] == [item.kind for item in few]
    loaded = jsonl_items(path)
    assert [e.kind for e in loaded] == ["ground"] * 4 + ["vqa"] * 4
    assert loaded[0].box == tuple(float(v) for v in few[0].box) and loaded[0].image.size == (SIZE, SIZE)
    assert loaded[4].answer == few[4].answer and loaded[4].text == few[4].text

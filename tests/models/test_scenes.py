"""Tests for models/builtin/scenes.py against /work/shared/specs/scenes.md.

Every rule is re-derived here from the spec text (phrase resolution, answers, pixel-centre rasterisation), not
from the module's helpers, so a drift in the generator fails a test instead of being copied by it.
"""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.builtin import scenes
from models.builtin.scenes import (
    COLORS,
    EVAL_SEED,
    EVAL_SIZE,
    SHAPES,
    TRAIN_SIZES,
    Scene,
    SceneObject,
    evaluation_set,
    grounding_correct,
    grounding_phrases,
    iou,
    make_grounding_item,
    make_vqa_item,
    normalize_answer,
    random_scene,
    render,
    render_array,
    training_rng,
    vqa_correct,
    vqa_questions,
)

SPEC_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
COLOR_RE = "|".join(SPEC_COLORS)
SHAPE_RE = "circle|square|triangle|diamond"
BACKGROUND = (230, 230, 230)

seeds = st.integers(min_value=0, max_value=2**32 - 1)
sizes = st.sampled_from(TRAIN_SIZES)
counts = st.one_of(st.none(), st.integers(min_value=1, max_value=5))


@st.composite
def scene_strategy(draw: st.DrawFn) -> Scene:
    return random_scene(random.Random(draw(seeds)), draw(sizes), draw(counts))


def centre(obj: SceneObject) -> tuple[float, float]:
    x1, y1, x2, y2 = obj.box
    return x1 + (x2 - x1) / 2, y1 + (y2 - y1) / 2


def resolve_phrase(scene: Scene, phrase: str) -> list[int]:
    """Indices the phrase names under the spec's rules; a valid phrase names exactly one."""
    objs = scene.objects
    if m := re.fullmatch(f"the ({COLOR_RE}) ({SHAPE_RE})", phrase):
        return [i for i, o in enumerate(objs) if (o.color, o.shape) == m.groups()]
    if m := re.fullmatch(f"the ({SHAPE_RE})", phrase):
        return [i for i, o in enumerate(objs) if o.shape == m[1]]
    if m := re.fullmatch(f"the ({COLOR_RE}) object", phrase):
        return [i for i, o in enumerate(objs) if o.color == m[1]]
    m = re.fullmatch(f"the (leftmost|rightmost|topmost|bottommost) ({SHAPE_RE})", phrase)
    assert m, f"phrase outside the spec's grammar: {phrase!r}"
    members = [i for i, o in enumerate(objs) if o.shape == m[2]]
    if len(members) < 2:
        return []
    axis = 0 if m[1] in ("leftmost", "rightmost") else 1
    values = sorted((centre(objs[i])[axis], i) for i in members)
    if m[1] in ("rightmost", "bottommost"):
        values.reverse()
    (best, winner), (second, _) = values[0], values[1]
    return [winner] if abs(second - best) >= scene.size / 10 else []


def all_spec_phrases() -> list[str]:
    phrases = [f"the {c} {s}" for c in SPEC_COLORS for s in SHAPES]
    phrases += [f"the {s}" for s in SHAPES] + [f"the {c} object" for c in SPEC_COLORS]
    phrases += [f"the {e} {s}" for e in ("leftmost", "rightmost", "topmost", "bottommost") for s in SHAPES]
    return phrases


def answer_question(scene: Scene, question: str) -> str | None:
    """The spec's answer, or None when the question may not be asked about this scene."""
    objs = scene.objects
    if m := re.fullmatch(f"What color is the ({SHAPE_RE})\\?", question):
        hits = [o.color for o in objs if o.shape == m[1]]
        return hits[0] if len(hits) == 1 else None
    if m := re.fullmatch(f"What shape is the ({COLOR_RE}) object\\?", question):
        hits = [o.shape for o in objs if o.color == m[1]]
        return hits[0] if len(hits) == 1 else None
    if m := re.fullmatch(f"How many ({SHAPE_RE})s are there\\?", question):
        return str(sum(o.shape == m[1] for o in objs))
    m = re.fullmatch(f"Is there a ({COLOR_RE}) ({SHAPE_RE})\\?", question)
    assert m, f"question outside the spec's grammar: {question!r}"
    return "yes" if any((o.color, o.shape) == m.groups() for o in objs) else "no"


def reference_pixels(obj: SceneObject, x: int, y: int) -> bool:
    """Is pixel (x, y) inside the shape? Float geometry at the pixel centre, written from the spec."""
    x1, y1, x2, y2 = obj.box
    px, py = x + 0.5, y + 0.5
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    if obj.shape == "square":
        return True
    if obj.shape == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 <= r**2
    if obj.shape == "diamond":
        return abs(px - cx) + abs(py - cy) <= r
    # triangle: apex (cx, y1), base corners (x1, y2) and (x2, y2)
    return abs(px - cx) <= (py - y1) * (x2 - x1) / (2 * (y2 - y1))


def test_constants_follow_spec() -> None:
    assert COLORS == SPEC_COLORS
    assert list(COLORS) == list(SPEC_COLORS)
    assert SHAPES == ("circle", "square", "triangle", "diamond")
    assert TRAIN_SIZES == (224, 280, 336, 392, 448) and EVAL_SIZE == 336


@settings(max_examples=300, deadline=None)
@given(seed=seeds, size=sizes, num_objects=counts)
def test_scene_geometry(seed: int, size: int, num_objects: int | None) -> None:
    scene = random_scene(random.Random(seed), size, num_objects)
    assert scene.size == size
    assert all(215 <= c <= 250 for c in scene.background)
    assert 1 <= len(scene.objects) <= 5
    if num_objects is not None:
        assert len(scene.objects) == num_objects
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        assert x2 - x1 == y2 - y1, "box not square"
        assert size / 10 <= x2 - x1 <= size / 4
        assert 0 <= x1 and 0 <= y1 and x2 <= size and y2 <= size
        assert obj.center == ((x1 + x2) / 2, (y1 + y2) / 2)
    for a, b in itertools.combinations([o.box for o in scene.objects], 2):
        empty_columns = max(b[0] - a[2], a[0] - b[2])
        empty_rows = max(b[1] - a[3], a[1] - b[3])
        assert max(empty_columns, empty_rows) >= 4, f"boxes {a} and {b} closer than 4 px"


@settings(max_examples=60, deadline=None)
@given(scene=scene_strategy())
def test_rendered_colours_exact(scene: Scene) -> None:
    image = render_array(scene)
    assert image.shape == (scene.size, scene.size, 3) and image.dtype == np.uint8
    inside_any = np.zeros((scene.size, scene.size), dtype=bool)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        assert tuple(image[(y1 + y2) // 2, (x1 + x2) // 2]) == COLORS[obj.color]
        region = image[y1:y2, x1:x2].reshape(-1, 3)
        painted = np.all(region == COLORS[obj.color], axis=1)
        assert np.all(painted | np.all(region == scene.background, axis=1)), "foreign colour in a box"
        if obj.shape == "square":
            assert painted.all()
        inside_any[y1:y2, x1:x2] = True
    assert np.all(image[~inside_any] == scene.background)


@settings(max_examples=60, deadline=None)
@given(scene=scene_strategy())
def test_render_matches_pixel_centre_geometry(scene: Scene) -> None:
    image = render_array(scene)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        expected = np.array([[reference_pixels(obj, x, y) for x in range(x1, x2)] for y in range(y1, y2)])
        drawn = np.all(image[y1:y2, x1:x2] == COLORS[obj.color], axis=2)
        assert np.array_equal(drawn, expected), f"{obj.shape} of side {obj.side} differs from its geometry"


def test_small_shapes_exact() -> None:
    objects = (
        SceneObject("red", "triangle", (0, 0, 7, 7)),
        SceneObject("blue", "diamond", (10, 0, 15, 5)),
        SceneObject("green", "circle", (20, 0, 24, 4)),
    )
    image = render_array(Scene(64, BACKGROUND, objects))
    triangle = [
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    diamond = [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]
    circle = [[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]]
    assert np.array_equal(np.all(image[0:7, 0:7] == COLORS["red"], axis=2), np.array(triangle, dtype=bool))
    assert np.array_equal(np.all(image[0:5, 10:15] == COLORS["blue"], axis=2), np.array(diamond, dtype=bool))
    assert np.array_equal(np.all(image[0:4, 20:24] == COLORS["green"], axis=2), np.array(circle, dtype=bool))
    assert tuple(image[10, 10]) == BACKGROUND and tuple(image[0, 7]) == BACKGROUND


@settings(max_examples=20, deadline=None)
@given(scene=scene_strategy())
def test_render_equals_render_array(scene: Scene) -> None:
    pil_image = render(scene)
    assert pil_image.mode == "RGB" and pil_image.size == (scene.size, scene.size)
    assert np.array_equal(np.asarray(pil_image), render_array(scene))


@settings(max_examples=300, deadline=None)
@given(scene=scene_strategy())
def test_grounding_phrases_are_exactly_the_valid_ones(scene: Scene) -> None:
    phrases = grounding_phrases(scene)
    assert len({p for p, _ in phrases}) == len(phrases), "duplicate phrase"
    for phrase, target in phrases:
        assert resolve_phrase(scene, phrase) == [target], phrase
    expected = {p: hits[0] for p in all_spec_phrases() if len(hits := resolve_phrase(scene, p)) == 1}
    assert dict(phrases) == expected


@pytest.mark.parametrize(
    ("size", "too_close", "far_enough"),
    [(336, 33, 34), (280, 27, 28)],  # lead must be >= S/10: 33.6 px at 336, exactly 28 px at 280
)
def test_extremal_margin_boundary(size: int, too_close: int, far_enough: int) -> None:
    def two_circles(dx: int) -> dict[str, int]:
        objects = (
            SceneObject("red", "circle", (0, 0, 40, 40)),
            SceneObject("blue", "circle", (dx, 100, dx + 40, 140)),
        )
        return dict(grounding_phrases(Scene(size, BACKGROUND, objects)))

    near, far = two_circles(too_close), two_circles(far_enough)
    assert "the leftmost circle" not in near and "the rightmost circle" not in near
    assert far["the leftmost circle"] == 0 and far["the rightmost circle"] == 1
    assert far["the topmost circle"] == 0 and far["the bottommost circle"] == 1
    assert "the circle" not in far and far["the red object"] == 0


@settings(max_examples=150, deadline=None)
@given(scene=scene_strategy(), seed=seeds)
def test_vqa_questions_answers(scene: Scene, seed: int) -> None:
    items = vqa_questions(scene, random.Random(seed))
    assert len({i.question for i in items}) == len(items), "duplicate question"
    for item in items:
        assert item.scene == scene
        assert answer_question(scene, item.question) == item.answer, item.question
    by_kind = {k: [i for i in items if i.kind == k] for k in ("color", "shape", "count", "exists")}
    assert len(by_kind["count"]) == 4
    assert len(items) == sum(len(v) for v in by_kind.values())
    yes = sum(i.answer == "yes" for i in by_kind["exists"])
    assert yes == len(by_kind["exists"]) - yes == len({(o.color, o.shape) for o in scene.objects})
    unique_shapes = sum(1 for s in SHAPES if sum(o.shape == s for o in scene.objects) == 1)
    assert len(by_kind["color"]) == unique_shapes


@settings(max_examples=60, deadline=None)
@given(seed=seeds, size=sizes, kinds=st.sets(st.sampled_from(scenes.PHRASE_KINDS), min_size=1))
def test_make_grounding_item_respects_kinds(seed: int, size: int, kinds: set[str]) -> None:
    item = make_grounding_item(random.Random(seed), size, sorted(kinds))
    assert item.kind in kinds and item.scene.size == size
    assert resolve_phrase(item.scene, item.phrase) == [item.target]
    assert item.box == item.scene.objects[item.target].box
    assert item.phrase in dict(grounding_phrases(item.scene))


@settings(max_examples=60, deadline=None)
@given(seed=seeds, size=sizes, kinds=st.sets(st.sampled_from(scenes.QUESTION_KINDS), min_size=1))
def test_make_vqa_item_respects_kinds(seed: int, size: int, kinds: set[str]) -> None:
    item = make_vqa_item(random.Random(seed), size, sorted(kinds))
    assert item.kind in kinds and item.scene.size == size
    assert answer_question(item.scene, item.question) == item.answer


def test_item_kinds_rejected_when_unknown() -> None:
    with pytest.raises(ValueError):
        make_grounding_item(random.Random(0), 336, ["leftmost"])
    with pytest.raises(ValueError):
        make_vqa_item(random.Random(0), 336, [])
    with pytest.raises(ValueError):
        random_scene(random.Random(0), 336, 6)


def test_vqa_sampling_balance() -> None:
    rng = random.Random(7)
    counts = [make_vqa_item(rng, 224, ["count"]).answer for _ in range(600)]
    assert {str(k) for k in range(6)} == set(counts)
    assert all(60 <= counts.count(str(k)) <= 140 for k in range(6))  # expected 100 each
    exists = [make_vqa_item(rng, 224, ["exists"]).answer for _ in range(400)]
    assert 160 <= exists.count("no") <= 240  # expected 200


def test_evaluation_set_default_is_balanced_and_valid() -> None:
    grounding, vqa = evaluation_set()
    assert len(grounding) == 1000 and len(vqa) == 1000
    assert all(i.scene.size == 336 for i in grounding + vqa)
    for kind in scenes.PHRASE_KINDS:
        assert sum(i.kind == kind for i in grounding) == 250
    for item in grounding:
        assert resolve_phrase(item.scene, item.phrase) == [item.target]
    for item in vqa:
        assert answer_question(item.scene, item.question) == item.answer
    count_answers = [i.answer for i in vqa if i.kind == "count"]
    assert sorted(set(count_answers)) == ["0", "1", "2", "3", "4", "5"]
    assert (
        max(map(count_answers.count, set(count_answers))) - min(map(count_answers.count, set(count_answers)))
        <= 1
    )
    assert [i.answer for i in vqa if i.kind == "exists"].count("no") == 125


def test_evaluation_set_deterministic() -> None:
    first = evaluation_set(40, 40)
    assert first == evaluation_set(40, 40) == evaluation_set(40, 40, EVAL_SIZE, EVAL_SEED)
    shorter = evaluation_set(10, 20)
    assert shorter[0] == first[0][:10] and shorter[1] == first[1][:20]
    assert evaluation_set(40, 40, seed=EVAL_SEED + 1) != first


def test_training_streams_disjoint_from_evaluation() -> None:
    n = 500
    grounding, vqa = evaluation_set(n, n)
    eval_scenes = {i.scene for i in grounding} | {i.scene for i in vqa}
    assert len(eval_scenes) == 2 * n
    for seed in (0, 1, 2, EVAL_SEED, 2 * EVAL_SEED):
        rng = training_rng(seed)
        train = [make_grounding_item(rng, EVAL_SIZE).scene for _ in range(n)]
        train += [make_vqa_item(rng, EVAL_SIZE).scene for _ in range(n)]
        assert not eval_scenes & set(train), f"training seed {seed} repeats an evaluation scene"
    assert training_rng(3).random() == random.Random(7).random()
    with pytest.raises(ValueError):
        training_rng(-1)


def test_iou_and_grounding_correct() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching, x2 exclusive
    assert iou((0, 0, 10, 10), (0, 0, 10, 5)) == 0.5
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert grounding_correct((0, 0, 10, 5), (0, 0, 10, 10))
    assert not grounding_correct((0, 0, 10, 4.9), (0, 0, 10, 10))
    assert not grounding_correct(None, (0, 0, 10, 10))


def test_normalize_answer_and_vqa_correct() -> None:
    assert normalize_answer("Red.") == "red"
    assert normalize_answer("  Yes. \n") == "yes"
    assert normalize_answer("3") == "3"
    assert normalize_answer("red..") == "red."
    assert vqa_correct(" Circle.", "circle")
    assert not vqa_correct("circles", "circle")
    assert not vqa_correct("the red", "red")

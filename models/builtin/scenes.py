"""Synthetic scenes: the data contract of the built-in model and of its benchmark.

Implements ``/work/shared/specs/scenes.md``. Independent generators (tests, benchmarks, clients) check the model
and the service against that file, so colours, shapes, sizes, gaps, phrase and question rules, answer words and
scoring here follow it exactly. Choices where the spec is silent:

- Box side: a uniform integer in ``[ceil(S/10), floor(S/4)]``, so every side satisfies ``S/10 <= side <= S/4``
  both exactly and after rounding the bounds to whole pixels. Scenes need ``S >= MIN_SIZE``.
- Gap: boxes ``a`` and ``b`` (x2, y2 exclusive) are far enough apart when ``max(dx, dy) >= 4`` with
  ``dx = max(b.x1 - a.x2, a.x1 - b.x2)`` (empty pixel columns between them) and ``dy`` likewise; this is the
  strict reading (it implies a Euclidean gap >= 4 too).
- Colour and shape of each object are drawn independently and uniformly; repeats, even of both, are allowed
  (the phrase rules skip whatever becomes ambiguous). Objects keep their placement order.
- Rasterisation samples pixel centres ``(x + 0.5, y + 0.5)`` against the geometric shape, in exact integer
  arithmetic; a pixel on the boundary is inside. Only pixels with ``x1 <= x < x2, y1 <= y < y2`` are drawn.
  Boundaries of circles and triangles never pass through a pixel centre, so only diamonds depend on "inside".
  Masks and colour patches are cached per side (a few MB in all), and ``render_array`` takes 35-75 us per
  336 px scene on one CPU core (``render`` adds PIL's copy), so rendering never limits training.
- Object centre (extremal phrases): ``((x1 + x2) / 2, (y1 + y2) / 2)``; "ahead by S/10" is ``>=``.
- Items: ``make_*_item`` picks the kind uniformly first, then samples scenes until that kind is possible, so
  kinds are balanced. Counting questions pick the answer uniformly in 0..5 and build a scene that has exactly
  that many of the shape (an answer of 5 is too rare to reach by rejection); "Is there" picks yes or no with
  probability 1/2. ``evaluation_set`` cycles the kinds and, within a kind, the counts 0..5 and yes/no, so its
  balance is exact.
- Seeds: ``training_rng(seed)`` is ``random.Random(2 * seed + 1)`` (odd); ``evaluation_set(seed=s)`` uses
  ``random.Random(4 * s)`` for grounding and ``random.Random(4 * s + 2)`` for VQA (even). Seeds must be >= 0
  (CPython seeds ``-n`` like ``n``), so training and evaluation never share a random stream.
- ``normalize_answer`` strips whitespace, lower-cases, drops one final period, and strips again.
- ``GroundingItem`` carries an extra ``kind`` field (defaulting to ``""``) for per-kind evaluation.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
TRAIN_SIZES: tuple[int, ...] = (224, 280, 336, 392, 448)
EVAL_SIZE = 336
EVAL_SEED = 1729
PHRASE_KINDS: tuple[str, ...] = ("color_shape", "shape", "color_object", "extremal")
QUESTION_KINDS: tuple[str, ...] = ("color", "shape", "count", "exists")
EXTREMES: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost")
BACKGROUND_RANGE = (215, 250)
MIN_GAP = 4
MIN_OBJECTS, MAX_OBJECTS = 1, 5
MIN_SIZE = 64
_PLACEMENT_TRIES = 100  # per object, before the whole scene restarts
_SCENE_RESTARTS = 1000
_ITEM_TRIES = 1000  # scenes sampled while looking for an item of the wanted kind


@dataclass(frozen=True)
class SceneObject:
    """One filled shape; ``box`` is its square drawing box (x1, y1, x2, y2), x2 and y2 exclusive."""

    color: str
    shape: str
    box: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if self.color not in COLORS or self.shape not in SHAPES:
            raise ValueError(f"unknown colour/shape {self.color!r}/{self.shape!r}")
        x1, y1, x2, y2 = self.box
        if x2 - x1 <= 0 or x2 - x1 != y2 - y1:
            raise ValueError(f"box must be square with a positive side, got {self.box}")

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    @property
    def side(self) -> int:
        return self.box[2] - self.box[0]


@dataclass(frozen=True)
class Scene:
    """A square image of side ``size`` with a flat ``background`` RGB and its objects, all inside the image."""

    size: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        for obj in self.objects:
            x1, y1, x2, y2 = obj.box
            if min(x1, y1) < 0 or max(x2, y2) > self.size:
                raise ValueError(f"box {obj.box} is outside the {self.size}x{self.size} image")


@dataclass(frozen=True)
class GroundingItem:
    """A phrase naming exactly one object; ``target`` indexes ``scene.objects`` and ``box`` is its box."""

    scene: Scene
    phrase: str
    target: int
    box: tuple[int, int, int, int]
    kind: str = ""


@dataclass(frozen=True)
class VQAItem:
    """A question with its one-word answer; ``kind`` is one of ``QUESTION_KINDS``."""

    scene: Scene
    question: str
    answer: str
    kind: str


def side_range(size: int) -> tuple[int, int]:
    """Inclusive whole-pixel side bounds: every side lies in [S/10, S/4] without rounding."""
    return math.ceil(size / 10), size // 4


def boxes_separated(a: Sequence[int], b: Sequence[int], gap: int = MIN_GAP) -> bool:
    """True when at least ``gap`` empty pixel rows or columns lie between boxes ``a`` and ``b``."""
    dx = max(b[0] - a[2], a[0] - b[2])
    dy = max(b[1] - a[3], a[1] - b[3])
    return max(dx, dy) >= gap


def _place(rng: random.Random, size: int, attributes: Sequence[tuple[str, str]]) -> Scene:
    """Place objects with the given (colour, shape) pairs by rejection sampling, restarting when stuck."""
    if size < MIN_SIZE:
        raise ValueError(f"scene size must be >= {MIN_SIZE}, got {size}")
    if not MIN_OBJECTS <= len(attributes) <= MAX_OBJECTS:
        raise ValueError(f"a scene holds {MIN_OBJECTS}..{MAX_OBJECTS} objects, got {len(attributes)}")
    low, high = side_range(size)
    background = (
        rng.randint(*BACKGROUND_RANGE),
        rng.randint(*BACKGROUND_RANGE),
        rng.randint(*BACKGROUND_RANGE),
    )
    for restart in range(_SCENE_RESTARTS):
        boxes: list[tuple[int, int, int, int]] = []
        for _ in attributes:
            side = rng.randint(low, high)
            for _ in range(_PLACEMENT_TRIES):
                x1, y1 = rng.randint(0, size - side), rng.randint(0, size - side)
                box = (x1, y1, x1 + side, y1 + side)
                if all(boxes_separated(box, other) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(attributes):
            if restart:
                logger.debug("placed %d objects after %d restarts", len(boxes), restart)
            objects = tuple(SceneObject(c, s, b) for (c, s), b in zip(attributes, boxes, strict=True))
            return Scene(size, background, objects)
    raise RuntimeError(f"could not place {len(attributes)} objects in a {size} px scene")


def random_scene(rng: random.Random, size: int, num_objects: int | None = None) -> Scene:
    """Sample a scene of side ``size`` with ``num_objects`` objects (uniform in 1..5 when None)."""
    count = rng.randint(MIN_OBJECTS, MAX_OBJECTS) if num_objects is None else num_objects
    attributes = [(rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(count)]
    return _place(rng, size, attributes)


@lru_cache(maxsize=1024)
def _shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean mask of shape ``(side, side, 3)``: which pixel centres of the box fall inside the shape.

    Coordinates are doubled so the test is exact integer arithmetic: a pixel centre sits at ``2 * i + 1`` and the
    box centre at ``side``, both in half-pixel units. The mask is repeated over the channel axis because
    ``np.copyto`` with same-shape operands is about 5x faster than with a broadcast colour or mask.
    """
    doubled = 2 * np.arange(side, dtype=np.int64) + 1
    dx = (doubled - side)[None, :]
    dy = (doubled - side)[:, None]
    if shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "circle":
        mask = dx * dx + dy * dy <= side * side
    elif shape == "diamond":
        mask = np.abs(dx) + np.abs(dy) <= side
    elif (
        shape == "triangle"
    ):  # half-width at depth h below the apex is h / 2; depth in half pixels is dy + side
        mask = 2 * np.abs(dx) <= dy + side
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask3 = np.repeat(mask[:, :, None], 3, axis=2)
    mask3.setflags(write=False)
    return mask3


@lru_cache(maxsize=1024)
def _color_patch(rgb: tuple[int, int, int], side: int) -> np.ndarray:
    """A ``uint8`` array of shape ``(side, side, 3)`` filled with ``rgb`` (read-only, cached)."""
    patch = np.empty((side, side, 3), dtype=np.uint8)
    for channel, value in enumerate(rgb):
        patch[:, :, channel] = value
    patch.setflags(write=False)
    return patch


def render_array(scene: Scene) -> np.ndarray:
    """Draw ``scene`` as a ``uint8`` array of shape ``(S, S, 3)`` with exact colours and no antialiasing."""
    size = scene.size
    # Fill by copying one interleaved RGB row into every row: ~10x faster than a broadcast (3,) or per-channel fill.
    row = np.tile(np.asarray(scene.background, dtype=np.uint8), size)
    image = np.empty((size, size * 3), dtype=np.uint8)
    image[:] = row
    image = image.reshape(size, size, 3)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        side = obj.side
        np.copyto(
            image[y1:y2, x1:x2], _color_patch(COLORS[obj.color], side), where=_shape_mask(obj.shape, side)
        )
    return image


def render(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an RGB PIL image, pixel-identical to ``render_array``."""
    return Image.fromarray(render_array(scene))


def _grounding_candidates(scene: Scene) -> list[tuple[str, str, int]]:
    """Every valid phrase as (kind, phrase, target index), in the order of ``PHRASE_KINDS``."""
    objects = scene.objects
    pairs = Counter((o.color, o.shape) for o in objects)
    shapes = Counter(o.shape for o in objects)
    colors = Counter(o.color for o in objects)
    found: list[tuple[str, str, int]] = []
    for i, o in enumerate(objects):
        if pairs[o.color, o.shape] == 1:
            found.append(("color_shape", f"the {o.color} {o.shape}", i))
    for i, o in enumerate(objects):
        if shapes[o.shape] == 1:
            found.append(("shape", f"the {o.shape}", i))
    for i, o in enumerate(objects):
        if colors[o.color] == 1:
            found.append(("color_object", f"the {o.color} object", i))
    margin = scene.size / 10
    for shape in SHAPES:
        members = [i for i, o in enumerate(objects) if o.shape == shape]
        if len(members) < 2:
            continue
        for extreme in EXTREMES:
            axis = 0 if extreme in ("leftmost", "rightmost") else 1
            sign = 1.0 if extreme in ("leftmost", "topmost") else -1.0  # smallest signed coordinate wins
            ranked = sorted(members, key=lambda i: sign * objects[i].center[axis])
            winner, runner_up = ranked[0], ranked[1]
            lead = sign * (objects[runner_up].center[axis] - objects[winner].center[axis])
            if lead >= margin:
                found.append(("extremal", f"the {extreme} {shape}", winner))
    return found


def grounding_phrases(scene: Scene) -> list[tuple[str, int]]:
    """Every valid, unambiguous phrase of ``scene`` with the index of the object it names."""
    return [(phrase, target) for _, phrase, target in _grounding_candidates(scene)]


def _color_question(shape: str, color: str) -> tuple[str, str]:
    return f"What color is the {shape}?", color


def _shape_question(color: str, shape: str) -> tuple[str, str]:
    return f"What shape is the {color} object?", shape


def _count_question(shape: str, count: int) -> tuple[str, str]:
    return f"How many {shape}s are there?", str(count)


def _exists_question(color: str, shape: str, present: bool) -> tuple[str, str]:
    return f"Is there a {color} {shape}?", "yes" if present else "no"


def vqa_questions(scene: Scene, rng: random.Random) -> list[VQAItem]:
    """Every valid question of ``scene``; "Is there" gets as many sampled absent pairs as present ones."""
    shapes = Counter(o.shape for o in scene.objects)
    colors = Counter(o.color for o in scene.objects)
    items: list[VQAItem] = []
    for o in scene.objects:
        if shapes[o.shape] == 1:
            items.append(VQAItem(scene, *_color_question(o.shape, o.color), "color"))
    for o in scene.objects:
        if colors[o.color] == 1:
            items.append(VQAItem(scene, *_shape_question(o.color, o.shape), "shape"))
    for shape in SHAPES:
        items.append(VQAItem(scene, *_count_question(shape, shapes[shape]), "count"))
    present_set = {(o.color, o.shape) for o in scene.objects}
    present = sorted(present_set)
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present_set]
    for color, shape in present:
        items.append(VQAItem(scene, *_exists_question(color, shape, True), "exists"))
    for color, shape in rng.sample(absent, len(present)):
        items.append(VQAItem(scene, *_exists_question(color, shape, False), "exists"))
    return items


def _check_kinds(kinds: Sequence[str] | None, allowed: tuple[str, ...]) -> list[str]:
    chosen = list(allowed if kinds is None else kinds)
    unknown = [k for k in chosen if k not in allowed]
    if not chosen or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {allowed}, got {kinds}")
    return chosen


def make_grounding_item(
    rng: random.Random, size: int, phrase_kinds: Sequence[str] | None = None
) -> GroundingItem:
    """Pick a phrase kind uniformly from ``phrase_kinds``, then sample scenes until one offers that kind."""
    kind = rng.choice(_check_kinds(phrase_kinds, PHRASE_KINDS))
    for _ in range(_ITEM_TRIES):
        scene = random_scene(rng, size)
        options = [(p, t) for k, p, t in _grounding_candidates(scene) if k == kind]
        if options:
            phrase, target = rng.choice(options)
            return GroundingItem(scene, phrase, target, scene.objects[target].box, kind)
    raise RuntimeError(f"no {kind!r} phrase in {_ITEM_TRIES} sampled {size} px scenes")


def _count_scene(rng: random.Random, size: int, shape: str, count: int) -> Scene:
    """A scene with exactly ``count`` objects of ``shape`` among 1..5 objects."""
    total = rng.randint(max(count, MIN_OBJECTS), MAX_OBJECTS)
    others = [s for s in SHAPES if s != shape]
    shapes = [shape] * count + [rng.choice(others) for _ in range(total - count)]
    rng.shuffle(shapes)
    return _place(rng, size, [(rng.choice(list(COLORS)), s) for s in shapes])


def _vqa_item(rng: random.Random, size: int, kind: str, answer: str | None = None) -> VQAItem:
    """One question of ``kind``; ``answer`` fixes the count digit or yes/no (random when None)."""
    if kind == "count":
        count = rng.randint(0, MAX_OBJECTS) if answer is None else int(answer)
        shape = rng.choice(SHAPES)
        return VQAItem(_count_scene(rng, size, shape, count), *_count_question(shape, count), kind)
    if kind == "exists":
        present = rng.random() < 0.5 if answer is None else answer == "yes"
        scene = random_scene(rng, size)
        pairs = {(o.color, o.shape) for o in scene.objects}
        pool = sorted(pairs) if present else [(c, s) for c in COLORS for s in SHAPES if (c, s) not in pairs]
        color, shape = rng.choice(pool)
        return VQAItem(scene, *_exists_question(color, shape, present), kind)
    for _ in range(_ITEM_TRIES):
        scene = random_scene(rng, size)
        if kind == "color":
            shapes = Counter(o.shape for o in scene.objects)
            options = [_color_question(o.shape, o.color) for o in scene.objects if shapes[o.shape] == 1]
        else:
            colors = Counter(o.color for o in scene.objects)
            options = [_shape_question(o.color, o.shape) for o in scene.objects if colors[o.color] == 1]
        if options:
            return VQAItem(scene, *rng.choice(options), kind)
    raise RuntimeError(f"no {kind!r} question in {_ITEM_TRIES} sampled {size} px scenes")


def make_vqa_item(rng: random.Random, size: int, question_kinds: Sequence[str] | None = None) -> VQAItem:
    """Pick a question kind uniformly from ``question_kinds`` and sample a valid question of it."""
    return _vqa_item(rng, size, rng.choice(_check_kinds(question_kinds, QUESTION_KINDS)))


def training_rng(seed: int) -> random.Random:
    """The training stream for ``seed`` (>= 0): ``random.Random(2 * seed + 1)``, never an evaluation stream."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return random.Random(2 * seed + 1)


def evaluation_set(
    num_grounding: int = 1000, num_vqa: int = 1000, size: int = EVAL_SIZE, seed: int = EVAL_SEED
) -> tuple[list[GroundingItem], list[VQAItem]]:
    """Regenerate the evaluation set: deterministic from ``seed``, exactly balanced over kinds and answers.

    Item ``i`` has kind ``KINDS[i % 4]``; the j-th count question answers ``j % 6`` and the j-th "Is there"
    question answers yes for even j. Grounding and VQA use separate streams, so each list is a prefix of the
    longer one built from the same seed.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    grounding_rng, vqa_rng = random.Random(4 * seed), random.Random(4 * seed + 2)
    grounding = [
        make_grounding_item(grounding_rng, size, [PHRASE_KINDS[i % len(PHRASE_KINDS)]])
        for i in range(num_grounding)
    ]
    vqa: list[VQAItem] = []
    for i in range(num_vqa):
        kind, j = QUESTION_KINDS[i % len(QUESTION_KINDS)], i // len(QUESTION_KINDS)
        answer = {"count": str(j % (MAX_OBJECTS + 1)), "exists": "no" if j % 2 else "yes"}.get(kind)
        vqa.append(_vqa_item(vqa_rng, size, kind, answer))
    return grounding, vqa


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of boxes (x1, y1, x2, y2) with exclusive x2, y2; 0.0 for empty unions."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


def grounding_correct(pred_box: Sequence[float] | None, target_box: Sequence[float]) -> bool:
    """Acc@0.5 as in RefCOCO: IoU >= 0.5; a missing prediction (None) is wrong."""
    return pred_box is not None and iou(pred_box, target_box) >= 0.5


def normalize_answer(text: str) -> str:
    """Lower-case, strip surrounding whitespace and one final period ("Red." -> "red")."""
    text = text.strip().lower()
    return text[:-1].strip() if text.endswith(".") else text


def vqa_correct(pred: str, answer: str) -> bool:
    """Exact match after ``normalize_answer`` on both sides."""
    return normalize_answer(pred) == normalize_answer(answer)


__all__ = [
    "COLORS",
    "EVAL_SEED",
    "EVAL_SIZE",
    "PHRASE_KINDS",
    "QUESTION_KINDS",
    "SHAPES",
    "TRAIN_SIZES",
    "GroundingItem",
    "Scene",
    "SceneObject",
    "VQAItem",
    "boxes_separated",
    "evaluation_set",
    "grounding_correct",
    "grounding_phrases",
    "iou",
    "make_grounding_item",
    "make_vqa_item",
    "normalize_answer",
    "random_scene",
    "render",
    "render_array",
    "side_range",
    "training_rng",
    "vqa_correct",
    "vqa_questions",
]

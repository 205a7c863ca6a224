"""A second, independent implementation of the scene contract, to check the model outside our own generator.

``python -m bench.contract_scenes --out runs/contract --per-kind 100`` writes PNG scenes and ``items.jsonl`` in
the `models.eval --data` format; score them with

    python -m models.eval --data runs/contract/items.jsonl --methods none --out runs/contract/RESULT.md

Why it exists: `models/builtin/scenes.py` draws shapes with its own pixel-centre masks, and the model is trained on exactly
those pixels. Checkers outside the project write their generators from ``shared/specs/scenes.md`` alone, so a model
that leaned on a quirk of our rasteriser would pass our evaluation and fail theirs. This module was written from
the spec without reading `models/builtin/scenes.py`: it draws with `PIL.ImageDraw` (other edge pixels, other triangle and
diamond rounding), samples scene layouts its own way and balances every kind and answer. Nothing here imports the
project's scene code; `tests/models/test_contract_scenes.py` checks the two implementations against each other.

Choices the spec leaves open, as made here:
- Object count uniform in 1..5, colour and shape independent and uniform, side ``round(uniform(S/10, S/4))``,
  positions by rejection sampling; a count question builds its scene around the chosen answer.
- Two boxes are apart when they are at least 4 px apart along x or along y (edges exclusive).
- "the {colour} {shape}" is asked only when that pair occurs once.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
EXTREMES = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)}
PHRASE_KINDS = ("color_shape", "shape", "color_object", "extremal")
QUESTION_KINDS = ("color", "shape", "count", "exists")
GAP = 4
MAX_OBJECTS = 5

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Thing:
    """One drawn object: colour name, shape name and its square box (x2, y2 exclusive)."""

    colour: str
    shape: str
    box: Box

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Item:
    """One contract item: the scene's objects, its background, the prompt and what a right answer is."""

    kind: str  # "ground/<phrase kind>" or "vqa/<question kind>"
    things: tuple[Thing, ...]
    background: tuple[int, int, int]
    text: str  # the phrase, or the question
    answer: str | None = None
    box: Box | None = None


def apart(a: Box, b: Box) -> bool:
    """True when the boxes are at least `GAP` px apart along x or along y."""
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _layout(rng: random.Random, attributes: list[tuple[str, str]], size: int) -> tuple[Thing, ...]:
    """Place the objects one by one, restarting the scene when one does not fit after 200 tries."""
    while True:
        things: list[Thing] = []
        for colour, shape in attributes:
            for _ in range(200):
                side = round(rng.uniform(size / 10, size / 4))
                x, y = rng.randint(0, size - side), rng.randint(0, size - side)
                box = (x, y, x + side, y + side)
                if all(apart(box, t.box) for t in things):
                    things.append(Thing(colour, shape, box))
                    break
            else:
                break
        if len(things) == len(attributes):
            return tuple(things)


def _random_attributes(rng: random.Random) -> list[tuple[str, str]]:
    return [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(rng.randint(1, MAX_OBJECTS))]


def draw(things: tuple[Thing, ...], background: tuple[int, int, int], size: int) -> Image.Image:
    """The scene with `PIL.ImageDraw` primitives (ImageDraw's coordinates are inclusive, hence the -1)."""
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    for thing in things:
        x1, y1, x2, y2 = thing.box
        right, bottom = x2 - 1, y2 - 1
        mid_x, mid_y = (x1 + right) / 2, (y1 + bottom) / 2
        fill = COLOURS[thing.colour]
        if thing.shape == "circle":
            pen.ellipse((x1, y1, right, bottom), fill=fill)
        elif thing.shape == "square":
            pen.rectangle((x1, y1, right, bottom), fill=fill)
        elif thing.shape == "triangle":
            pen.polygon([(mid_x, y1), (right, bottom), (x1, bottom)], fill=fill)
        else:
            pen.polygon([(mid_x, y1), (right, mid_y), (mid_x, bottom), (x1, mid_y)], fill=fill)
    return image


def phrases(things: tuple[Thing, ...], kind: str, size: int) -> list[tuple[str, int]]:
    """Every (phrase, target index) of `kind` that names exactly one object of the scene."""
    pairs = [(t.colour, t.shape) for t in things]
    shapes = [t.shape for t in things]
    colours = [t.colour for t in things]
    found: list[tuple[str, int]] = []
    for index, thing in enumerate(things):
        if kind == "color_shape" and pairs.count(pairs[index]) == 1:
            found.append((f"the {thing.colour} {thing.shape}", index))
        elif kind == "shape" and shapes.count(thing.shape) == 1:
            found.append((f"the {thing.shape}", index))
        elif kind == "color_object" and colours.count(thing.colour) == 1:
            found.append((f"the {thing.colour} object", index))
    if kind == "extremal":
        for shape in SHAPES:
            same = [i for i, s in enumerate(shapes) if s == shape]
            if len(same) < 2:
                continue
            for word, (axis, sign) in EXTREMES.items():
                ranked = sorted(same, key=lambda i: sign * things[i].centre[axis], reverse=True)
                lead = sign * (things[ranked[0]].centre[axis] - things[ranked[1]].centre[axis])
                if lead >= size / 10:
                    found.append((f"the {word} {shape}", ranked[0]))
    return found


def _background(rng: random.Random) -> tuple[int, int, int]:
    return rng.randint(215, 250), rng.randint(215, 250), rng.randint(215, 250)


def grounding_items(rng: random.Random, per_kind: int, size: int) -> Iterator[Item]:
    """`per_kind` items of each phrase kind, drawing random scenes until one offers the kind."""
    for kind in PHRASE_KINDS:
        made = 0
        while made < per_kind:
            things = _layout(rng, _random_attributes(rng), size)
            options = phrases(things, kind, size)
            if options:
                phrase, target = rng.choice(options)
                yield Item(f"ground/{kind}", things, _background(rng), phrase, box=things[target].box)
                made += 1


def _unique_attribute_item(rng: random.Random, kind: str, size: int) -> Item:
    """A colour-of-shape or shape-of-colour question about an object whose named attribute is unique."""
    while True:
        things = _layout(rng, _random_attributes(rng), size)
        named = [t.shape if kind == "color" else t.colour for t in things]
        unique = [t for t, n in zip(things, named, strict=True) if named.count(n) == 1]
        if unique:
            thing = rng.choice(unique)
            if kind == "color":
                return Item(
                    "vqa/color", things, _background(rng), f"What color is the {thing.shape}?", thing.colour
                )
            question = f"What shape is the {thing.colour} object?"
            return Item("vqa/shape", things, _background(rng), question, thing.shape)


def question_items(rng: random.Random, per_kind: int, size: int) -> Iterator[Item]:
    """`per_kind` questions of each kind; counts balanced over 0..5 and "is there" half yes, half no."""
    for kind in ("color", "shape"):
        for _ in range(per_kind):
            yield _unique_attribute_item(rng, kind, size)
    counts = [i % (MAX_OBJECTS + 1) for i in range(per_kind)]
    rng.shuffle(counts)
    for count in counts:
        shape = rng.choice(SHAPES)
        others = [s for s in SHAPES if s != shape]
        total = rng.randint(max(count, 1), MAX_OBJECTS)
        attributes = [(rng.choice(list(COLOURS)), shape) for _ in range(count)]
        attributes += [(rng.choice(list(COLOURS)), rng.choice(others)) for _ in range(total - count)]
        rng.shuffle(attributes)
        things = _layout(rng, attributes, size)
        yield Item("vqa/count", things, _background(rng), f"How many {shape}s are there?", str(count))
    answers = ["yes", "no"] * (per_kind // 2) + ["yes"] * (per_kind % 2)
    rng.shuffle(answers)
    for answer in answers:
        things = _layout(rng, _random_attributes(rng), size)
        present = {(t.colour, t.shape) for t in things}
        pool = (
            sorted(present)
            if answer == "yes"
            else [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        )
        colour, shape = rng.choice(pool)
        yield Item("vqa/exists", things, _background(rng), f"Is there a {colour} {shape}?", answer)


def generate(seed: int = 12345, per_kind: int = 100, size: int = 336) -> list[Item]:
    """Every grounding item, then every question, from one seeded stream."""
    rng = random.Random(seed)
    return [*grounding_items(rng, per_kind, size), *question_items(rng, per_kind, size)]


def write(items: list[Item], out: Path, size: int) -> Path:
    """PNGs under out/img and out/items.jsonl in the `models.eval --data` format (plus each item's kind)."""
    (out / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for number, item in enumerate(items):
        name = f"img/{number:05d}.png"
        draw(item.things, item.background, size).save(out / name)
        record: dict[str, object] = {"kind": item.kind, "image": name}
        if item.box is not None:
            record.update(type="ground", phrase=item.text, box=list(item.box))
        else:
            record.update(type="vqa", question=item.text, answer=item.answer)
        lines.append(json.dumps(record))
    path = out / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for img/ and items.jsonl")
    parser.add_argument("--per-kind", type=int, default=100, help="items of each phrase and question kind")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--size", type=int, default=336, help="scene side S in pixels")
    args = parser.parse_args()
    path = write(generate(args.seed, args.per_kind, args.size), args.out, args.size)
    print(path)


if __name__ == "__main__":
    main()

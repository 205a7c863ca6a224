"""What the retention study scores: evaluation items from the contract scenes, a curriculum stage, or a JSONL file;
and what calibration scores: the calibration split, scenes from a seed that the evaluation set never uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from models.builtin import scenes


@dataclass(frozen=True)
class EvalItem:
    """One scored item: a grounding phrase with its box, or a question with its answer."""

    kind: str  # "ground" | "vqa"
    image: Image.Image
    text: str
    box: tuple[float, float, float, float] | None = None
    answer: str | None = None
    subkind: str | None = None  # e.g. "ground/extremal", "vqa/count": scored apart in the per-kind table


CALIBRATION_SEED = 2718
"""Seed of the calibration split (`scenes.evaluation_set(seed=CALIBRATION_SEED)`).

The evaluation set is `scenes.evaluation_set(seed=EVAL_SEED)`: its streams are `random.Random(4 * 1729)` and
`random.Random(4 * 1729 + 2)`; this seed's are `random.Random(4 * 2718)` and `random.Random(4 * 2718 + 2)`, and
training streams are odd (`2 * seed + 1`), so the three never share a stream. `tests/models/test_calibrate.py`
checks that no calibration scene is an evaluation scene.
"""


ITEMS_PER_KIND = 1000
"""Grounding and VQA items each of the evaluation set (and of a stage's held-out set) when no limit is given."""


def scene_items(limit: int | None = None, seed: int = scenes.EVAL_SEED) -> list[EvalItem]:
    """The committed evaluation set (regenerated from its seed), grounding items first."""
    count = limit if limit is not None else ITEMS_PER_KIND
    grounding, vqa = scenes.evaluation_set(num_grounding=count, num_vqa=count, seed=seed)
    items = [
        EvalItem(
            "ground",
            scenes.render(item.scene),
            item.phrase,
            box=tuple(map(float, item.box)),
            subkind=f"ground/{item.kind}",
        )
        for item in grounding
    ]
    items += [
        EvalItem(
            "vqa", scenes.render(item.scene), item.question, answer=item.answer, subkind=f"vqa/{item.kind}"
        )
        for item in vqa
    ]
    return items


def calibration_items(count: int) -> list[EvalItem]:
    """`count` grounding and `count` VQA items of the calibration split (disjoint from the evaluation set)."""
    if scenes.EVAL_SEED == CALIBRATION_SEED:  # a guard against someone moving one seed onto the other
        raise RuntimeError("the calibration seed must differ from the evaluation seed")
    return scene_items(count, seed=CALIBRATION_SEED)


def stage_items(stage: str, limit: int | None = None) -> list[EvalItem]:
    """Held-out items of one training-curriculum stage (`models.builtin.data.STAGES`), grounding items first.

    ``single`` (one object per scene) measures pruning where a partly trained built-in model already grounds:
    on the evaluation set's 1-5 objects a model that cannot yet tell objects apart scores near zero unpruned,
    and retention is then noise.
    """
    from models.builtin.data import stage_eval_examples

    count = limit if limit is not None else ITEMS_PER_KIND
    items = []
    for example in stage_eval_examples(stage, 2 * count):
        image = scenes.render(example.scene)
        if example.box is not None:
            box = tuple(map(float, example.box))
            items.append(EvalItem("ground", image, str(example.phrase), box=box, subkind=example.kind))
        else:
            items.append(EvalItem("vqa", image, example.prompt, answer=example.answer, subkind=example.kind))
    return items


def jsonl_items(path: Path, limit: int | None = None) -> list[EvalItem]:
    """User-supplied RefCOCO-style / VQA items (format in the module docstring)."""
    items: list[EvalItem] = []
    counts = {"ground": 0, "vqa": 0}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        kind = record.get("type")
        if kind not in counts:
            raise ValueError(f"{path}:{number}: type must be 'ground' or 'vqa', got {kind!r}")
        if limit is not None and counts[kind] >= limit:
            continue
        image = Image.open(path.parent / record["image"]).convert("RGB")
        subkind = None if record.get("kind") is None else str(record["kind"])
        if kind == "ground":
            box = tuple(map(float, record["box"]))
            items.append(EvalItem("ground", image, record["phrase"], box=box, subkind=subkind))
        else:
            items.append(
                EvalItem("vqa", image, record["question"], answer=str(record["answer"]), subkind=subkind)
            )
        counts[kind] += 1
    return items


__all__ = ["CALIBRATION_SEED", "EvalItem", "calibration_items", "jsonl_items", "scene_items", "stage_items"]

"""Where the built-in model's grounding goes wrong: which object its box lands on, and where its heads look.

Accuracy alone cannot tell a model that finds the right object but draws a loose box from one that picks the
wrong object. These two measurements could, and each one changed the training recipe (docs/MODEL.md):
- failure classes: every grounding answer is `correct`, on the right object but with IoU < 0.5
  (`right_object_imprecise`), on another object (`wrong_object`), on no object (`nowhere`), or not a box;
- head target rates: for every LLM layer and head, at the position that predicts the first location token,
  how often the object with the largest attention mass is the named one, and how much of the attention
  goes to the image at all.

Usage:
    python -m models.builtin.diagnose                      # committed built-in model, first 100 evaluation items
    python -m models.builtin.diagnose --model checkpoints/builtin-all/checkpoint --limit 200
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    ProcessorMixin,
)

from models.builtin import BUILTIN_MODEL_DIR, scenes
from models.builtin.data import Example, TokenTable, box_patch_shares, collate, official_eval_examples
from models.builtin.train import answer_start_positions, generate_answers, predicted_box

FAILURE_CLASSES = ("correct", "right_object_imprecise", "wrong_object", "nowhere", "no_box")


def classify_box(box: Sequence[float] | None, scene: scenes.Scene, target: Sequence[int]) -> str:
    """One of `FAILURE_CLASSES` for a predicted box (scene pixels) against the target object's box.

    A wrong box counts as on an object when it overlaps that object best and with IoU >= 0.3; the named object
    is told apart by its box.
    """
    if box is None:
        return "no_box"
    if scenes.iou(box, target) >= 0.5:
        return "correct"
    overlaps = [(scenes.iou(box, obj.box), obj.box) for obj in scene.objects]
    best_iou, best_box = max(overlaps, key=lambda pair: pair[0])
    if tuple(best_box) == tuple(target) and best_iou > 0:
        return "right_object_imprecise"
    return "wrong_object" if best_iou >= 0.3 else "nowhere"


def _batches(items: Sequence[Example], size: int) -> list[Sequence[Example]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


@torch.no_grad()
def grounding_failures(
    model: LlavaForConditionalGeneration,
    processor: ProcessorMixin,
    items: Sequence[Example],
    batch_size: int = 25,
) -> dict[str, Counter[str]]:
    """Failure classes per phrase kind (and "all"), from greedy answers of the unpruned model."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for batch in _batches(items, batch_size):
        answers = generate_answers(model, processor, batch, max_new_tokens=6)
        for item, answer in zip(batch, answers, strict=True):
            label = classify_box(predicted_box(answer, item.scene.size), item.scene, item.box)
            counts[item.kind][label] += 1
            counts["all"][label] += 1
    return dict(counts)


@dataclass
class HeadRates:
    """Per (layer, head): share of items whose most-attended object is the target, and mean image mass."""

    target_hits: torch.Tensor  # (layers, heads), in [0, 1]
    image_mass: torch.Tensor  # (layers, heads), in [0, 1]
    items: int


@torch.no_grad()
def head_target_rates(
    model: LlavaForConditionalGeneration,
    processor: ProcessorMixin,
    items: Sequence[Example],
    batch_size: int = 25,
) -> HeadRates:
    """Where every head looks at the position that predicts the first location token (eager attention)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    table = TokenTable(processor.tokenizer)
    text_config = model.config.text_config
    hits = torch.zeros(text_config.num_hidden_layers, text_config.num_attention_heads)
    mass = torch.zeros_like(hits)
    try:
        for batch in _batches(items, batch_size):
            tensors = collate(list(batch), table)
            out = model.model(
                input_ids=tensors["input_ids"].to(model.device),
                pixel_values=tensors["pixel_values"].to(model.device),
                attention_mask=tensors["attention_mask"].to(model.device),
                output_attentions=True,
            )
            start = answer_start_positions(tensors["labels"])
            image = (tensors["input_ids"] == model.config.image_token_id).to(model.device)
            for r, item in enumerate(batch):
                # (layers, heads, 144): attention of the answer start over the visual tokens
                weights = torch.stack(
                    [layer[r, :, start[r]][:, image[r]].float().cpu() for layer in out.attentions]
                )
                shares = torch.from_numpy(
                    np.stack([box_patch_shares(obj.box, item.scene.size) for obj in item.scene.objects])
                )
                target = next(
                    i for i, obj in enumerate(item.scene.objects) if tuple(obj.box) == tuple(item.box)
                )
                hits += (torch.einsum("lhn,on->lho", weights, shares).argmax(-1) == target).float()
                mass += weights.sum(-1)
    finally:
        model.set_attn_implementation(previous)
    return HeadRates(target_hits=hits / len(items), image_mass=mass / len(items), items=len(items))


def failures_table(counts: dict[str, Counter[str]]) -> str:
    """Markdown table: one row per phrase kind, one column per failure class."""
    lines = [
        "| kind | items | " + " | ".join(FAILURE_CLASSES) + " |",
        "|---" * (len(FAILURE_CLASSES) + 2) + "|",
    ]
    for kind in sorted(counts, key=lambda k: (k == "all", k)):
        row = counts[kind]
        total = sum(row.values())
        lines.append(f"| {kind} | {total} | " + " | ".join(str(row[c]) for c in FAILURE_CLASSES) + " |")
    return "\n".join(lines)


def heads_table(rates: HeadRates) -> str:
    """Markdown table: per layer, each head's target-hit rate with its image mass in brackets."""
    heads = rates.target_hits.shape[1]
    lines = ["| layer | " + " | ".join(f"head {h}" for h in range(heads)) + " |", "|---" * (heads + 1) + "|"]
    for layer in range(rates.target_hits.shape[0]):
        cells = [
            f"{rates.target_hits[layer, h]:.2f} ({rates.image_mass[layer, h]:.2f})" for h in range(heads)
        ]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(BUILTIN_MODEL_DIR), help="a built-in-model directory")
    parser.add_argument("--limit", type=int, default=100, help="grounding items of the evaluation set")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    items = [e for e in official_eval_examples(args.limit) if e.box is not None]
    rates = head_target_rates(model, processor, items)
    report = [
        f"Grounding failures, first {len(items)} evaluation items, unpruned:",
        "",
        failures_table(grounding_failures(model, processor, items)),
        "",
        "Per head at the first location token: share of items whose most-attended object is the named one",
        "(share of the attention on the image in brackets):",
        "",
        heads_table(rates),
    ]
    print("\n".join(report))  # noqa: T201  (CLI output)


if __name__ == "__main__":
    main()

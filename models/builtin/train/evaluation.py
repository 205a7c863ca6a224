"""Evaluation during training: greedy answers through the real processor, scored like the retention study."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import LlavaForConditionalGeneration, ProcessorMixin

from models.boxes import Frame, parse_boxes
from models.builtin import scenes
from models.builtin.data import Example
from models.builtin.train.precision import autocast_for


@torch.no_grad()
def generate_answers(
    model: LlavaForConditionalGeneration,
    processor: ProcessorMixin,
    examples: Sequence[Example],
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy answers (special tokens kept, so location tokens survive) through the real processor and chat
    template, as the service would build the inputs; one padded batch."""
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.prompt}]}],
            add_generation_prompt=True,
        )
        for ex in examples
    ]
    images = [scenes.render(ex.scene) for ex in examples]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(model.device)
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=False)


@torch.no_grad()
def evaluate(
    model: LlavaForConditionalGeneration,
    processor: ProcessorMixin,
    examples: list[Example],
    batch_size: int = 32,
) -> dict[str, float]:
    """Greedy generation through the real processor; Acc@0.5 for grounding, exact match for questions.

    Returns:
        {"ground_acc", "vqa_acc", "<kind>_acc" per item kind, "ground_n", "vqa_n"}.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        with autocast_for(device):
            answers = generate_answers(model, processor, chunk)
        for ex, answer in zip(chunk, answers, strict=True):
            hits[ex.kind].append(_is_correct(ex, answer, processor))
    if was_training:
        model.train()
    metrics: dict[str, float] = {}
    for family in ("ground", "vqa"):
        family_hits = [h for kind, values in hits.items() if kind.startswith(family) for h in values]
        if family_hits:
            metrics[f"{family}_acc"] = sum(family_hits) / len(family_hits)
            metrics[f"{family}_n"] = len(family_hits)
    for kind, values in sorted(hits.items()):
        metrics[f"{kind}_acc"] = sum(values) / len(values)
    return metrics


def predicted_box(answer: str, size: int) -> tuple[float, float, float, float] | None:
    """The first box of a built-in-model answer, in pixels of its square scene of side `size` (None: no box)."""
    boxes = parse_boxes(answer, "loc_tokens", (size, size))
    if not boxes:
        return None
    return Frame.resize((size, size), (size, size)).to_original(boxes[0].xyxy_norm)


def _is_correct(example: Example, answer: str, processor: ProcessorMixin) -> bool:
    if example.box is not None:
        predicted = predicted_box(answer, example.scene.size)
        return predicted is not None and scenes.grounding_correct(predicted, example.box)
    text = answer
    for token in (processor.tokenizer.eos_token, processor.tokenizer.pad_token):
        text = text.replace(token, "")
    return scenes.vqa_correct(text, example.answer)


__all__ = ["evaluate", "generate_answers", "predicted_box"]

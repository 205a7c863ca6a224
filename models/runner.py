"""Task-level entry point for the serving worker: images + queries in, answers / boxes / reports out.

`ModelRunner` owns one family adapter and knows the checkpoint's conventions: how to phrase a grounding request,
which box format the model emits (`models/grounding.py`), and how to map a box on the model input back to the
original image (LLaVA pads to a square, Qwen resizes). The worker only calls `run`, `warmup` and the size
estimators; it never touches tensors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from models.base import VisionLanguageAdapter
from models.grounding import BoxFormat, grounding_prompt, parse_boxes
from models.tasks import BatchTimings, Box, TaskRequest, TaskResult

logger = logging.getLogger(__name__)

VQA_SUFFIX = {
    "loc_tokens": "",
    "qwen2_5_vl_json": "",
    "llava_norm": "\nAnswer the question using a single word or phrase.",
}


def detect_box_format(adapter: VisionLanguageAdapter) -> BoxFormat:
    """Location tokens if the tokenizer has them (our built-in model), else the family's native format."""
    tokenizer = getattr(adapter.processor, "tokenizer", adapter.processor)
    if "<loc_0>" in tokenizer.get_vocab():
        return "loc_tokens"
    return "qwen2_5_vl_json" if adapter.family == "qwen2_5_vl" else "llava_norm"


class ModelRunner:
    """Runs batches of `TaskRequest`s on one adapter (see module docstring)."""

    def __init__(self, adapter: VisionLanguageAdapter, name: str) -> None:
        self.adapter = adapter
        self.name = name
        self.box_format: BoxFormat = detect_box_format(adapter)

    @property
    def device(self) -> str:
        return str(self.adapter.device)

    def estimate_visual_tokens(self, image_size: tuple[int, int]) -> int:
        """Unpruned visual tokens for an image of (w, h), from the size alone (admission control)."""
        return int(self.adapter.estimate_visual_tokens(image_size))

    def model_input_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return self.adapter.model_input_size(image_size)

    def input_to_original(
        self, box_norm: tuple[float, float, float, float], image_size: tuple[int, int]
    ) -> tuple[float, float, float, float]:
        """A box in 0..1 of the model input -> original pixels (clipped to the image)."""
        offset_x, offset_y, extent_x, extent_y = self.adapter.frame_for(image_size)
        width, height = image_size
        x1, y1, x2, y2 = box_norm

        def clip(value: float, limit: int) -> float:
            return min(max(value, 0.0), float(limit))

        return (
            clip(x1 * extent_x - offset_x, width),
            clip(y1 * extent_y - offset_y, height),
            clip(x2 * extent_x - offset_x, width),
            clip(y2 * extent_y - offset_y, height),
        )

    def prompt_for(self, task: TaskRequest) -> str:
        if task.kind == "ground":
            return grounding_prompt(task.text, self.box_format)
        if task.kind == "answer":
            return task.text + VQA_SUFFIX[self.box_format]
        return task.text

    def warmup(self) -> None:
        """One real batched forward (a synthetic scene-like image), so readiness means the device works."""
        image = Image.new("RGB", (96, 64), (230, 230, 230))
        image.paste((220, 30, 30), (20, 16, 44, 40))
        self.run(
            [TaskRequest(image=image, kind="answer", text="What color is the square?", max_new_tokens=2)]
        )

    @torch.inference_mode()
    def run(self, tasks: Sequence[TaskRequest]) -> tuple[list[TaskResult], BatchTimings]:
        """One batched pass for requests with different images, budgets and methods."""
        start = time.perf_counter()
        images = [task.image for task in tasks]
        batch = self.adapter.prepare(images, [self.prompt_for(task) for task in tasks])
        preprocess = time.perf_counter() - start
        output = self.adapter.generate(
            batch, [task.config for task in tasks], max_new_tokens=[task.max_new_tokens for task in tasks]
        )
        tokenizer = getattr(self.adapter.processor, "tokenizer", self.adapter.processor)
        results = []
        for b, task in enumerate(tasks):
            ids = output.sequences[b]
            raw = tokenizer.decode(ids, skip_special_tokens=False)
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            raw = _strip_end_tokens(raw, tokenizer)
            image_size = batch.image_sizes[b]
            boxes: tuple[Box, ...] = ()
            if task.kind == "ground":
                boxes = tuple(self._boxes(raw, task.text, image_size, batch.model_input_sizes[b]))
                if self.box_format == "loc_tokens":
                    text = raw
            results.append(
                TaskResult(
                    text=text,
                    raw_output=raw,
                    boxes=boxes,
                    report=output.reports[b],
                    image_size=image_size,
                    model_input_size=batch.model_input_sizes[b],
                    prompt_tokens=output.prompt_tokens[b],
                    completion_tokens=len(ids),
                )
            )
        timings = output.timings
        return results, BatchTimings(
            preprocess=preprocess,
            vision=timings.get("vision", 0.0),
            prune=timings.get("prune", 0.0),
            prefill=timings.get("prefill", 0.0),
            decode=timings.get("decode", 0.0),
        )

    def _boxes(
        self, raw: str, label: str, image_size: tuple[int, int], input_size: tuple[int, int]
    ) -> list[Box]:
        width, height = image_size
        boxes = []
        for parsed in parse_boxes(raw, self.box_format, input_size, label=label):
            xyxy = self.input_to_original(parsed.xyxy_norm, image_size)
            if xyxy[2] - xyxy[0] <= 0 or xyxy[3] - xyxy[1] <= 0:
                continue
            norm = (xyxy[0] / width, xyxy[1] / height, xyxy[2] / width, xyxy[3] / height)
            boxes.append(Box(label=parsed.label or label, xyxy=xyxy, xyxy_norm=norm))
        return boxes


def _strip_end_tokens(text: str, tokenizer: Any) -> str:
    for token in (tokenizer.eos_token, tokenizer.pad_token):
        if token:
            text = text.replace(token, "")
    return text.strip()


__all__ = ["ModelRunner", "detect_box_format"]

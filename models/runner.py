"""Task-level entry point for the serving worker: images + queries in, answers / boxes / reports out.

`ModelRunner` owns one family adapter and knows the checkpoint's conventions: how to phrase a grounding request and
which box format the model emits (`models/boxes.py`); each sample's `Frame` (from the adapter, which knows how it
framed the image) maps the boxes back to original pixels. The worker only calls `run`, `warmup` and the size
estimators; it never touches tensors.

The runner is also where a request's pruning plan is chosen, because it is the one place that knows both the
task kind and the model directory: a `method=nuwa` request runs the calibrated plan of the model's
`pruning_plans.json` for its kind and budget when there is one (`models/plans.py`), and its report says so.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from models.boxes import BoxFormat, Frame, grounding_prompt, parse_boxes
from models.budget import PruningConfig
from models.engine import VisionLanguageAdapter
from models.plans import CALIBRATED_METHOD, PlanTable
from models.tasks import BatchTimings, Box, TaskRequest, TaskResult, VisualTokenReport

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

    def __init__(self, adapter: VisionLanguageAdapter, name: str, plans: PlanTable | None = None) -> None:
        self.adapter = adapter
        self.name = name
        self.box_format: BoxFormat = detect_box_format(adapter)
        self.plans = plans if plans is not None else PlanTable()

    @property
    def device(self) -> str:
        return str(self.adapter.device)

    def estimate_visual_tokens(self, image_size: tuple[int, int]) -> int:
        """Unpruned visual tokens for an image of (w, h), from the size alone (admission control)."""
        return int(self.adapter.estimate_visual_tokens(image_size))

    def frame_for(self, image_size: tuple[int, int]) -> Frame:
        """Where an original image of (w, h) will sit in the model input, from the size alone."""
        return self.adapter.frame_for(image_size)

    def prompt_for(self, task: TaskRequest) -> str:
        if task.kind == "ground":
            return grounding_prompt(task.text, self.box_format)
        if task.kind == "answer":
            return task.text + VQA_SUFFIX[self.box_format]
        return task.text

    def resolve_plan(self, task: TaskRequest) -> tuple[PruningConfig, str | None]:
        """The config `task` runs with and its calibrated plan's label (None: its own config, as sent)."""
        if not self.plans or task.config.method != CALIBRATED_METHOD:
            return task.config, None
        return self.plans.resolve(task.config, task.kind, self.estimate_visual_tokens(task.image.size))

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
        resolved = [self.resolve_plan(task) for task in tasks]
        preprocess = time.perf_counter() - start
        output = self.adapter.generate(
            batch, [config for config, _ in resolved], max_new_tokens=[task.max_new_tokens for task in tasks]
        )
        tokenizer = getattr(self.adapter.processor, "tokenizer", self.adapter.processor)
        results = []
        for b, task in enumerate(tasks):
            ids = output.sequences[b]
            raw = tokenizer.decode(ids, skip_special_tokens=False)
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            raw = _strip_end_tokens(raw, tokenizer)
            frame = batch.frames[b]
            boxes: tuple[Box, ...] = ()
            if task.kind == "ground":
                boxes = tuple(self._boxes(raw, task.text, frame))
                if self.box_format == "loc_tokens":
                    text = raw
            results.append(
                TaskResult(
                    text=text,
                    raw_output=raw,
                    boxes=boxes,
                    report=_labelled(output.reports[b], resolved[b][1]),
                    frame=frame,
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

    def _boxes(self, raw: str, label: str, frame: Frame) -> list[Box]:
        width, height = frame.original_size
        boxes = []
        for parsed in parse_boxes(raw, self.box_format, frame.input_size, label=label):
            xyxy = frame.clip(frame.to_original(parsed.xyxy_norm))
            if xyxy[2] - xyxy[0] <= 0 or xyxy[3] - xyxy[1] <= 0:
                continue
            norm = (xyxy[0] / width, xyxy[1] / height, xyxy[2] / width, xyxy[3] / height)
            boxes.append(Box(label=parsed.label or label, xyxy=xyxy, xyxy_norm=norm))
        return boxes


def _labelled(report: VisualTokenReport, label: str | None) -> VisualTokenReport:
    """`report` with the calibrated plan's label, when one ran."""
    return report if label is None else dataclasses.replace(report, plan=label)


def _strip_end_tokens(text: str, tokenizer: Any) -> str:
    for token in (tokenizer.eos_token, tokenizer.pad_token):
        if token:
            text = text.replace(token, "")
    return text.strip()


__all__ = ["ModelRunner", "detect_box_format"]

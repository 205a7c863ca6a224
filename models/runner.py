"""Task-level entry point for the serving worker: images + queries in, answers / boxes / reports out.

`ModelRunner` owns one family adapter and knows the checkpoint's conventions: how to phrase a grounding request and
which box format the model emits (`models/boxes.py`); each sample's `Frame` (from the adapter, which knows how it
framed the image) maps the boxes back to original pixels. The worker only calls `prepare` / `execute` (or `run`,
both at once), `warmup` and the geometry; it never touches tensors.

`prepare` (CPU: resize, normalise, tokenise) and `execute` (the device: vision, pruning, prefill, decode) are apart
so the worker can prepare the next batch on another thread while this one runs.

The runner is also where a request's pruning plan is chosen, because it is the one place that knows both the
task kind and the model directory: a `method=nuwa` request runs the calibrated plan of the model's
`pruning_plans.json` for its kind and budget when there is one (`models/plans.py`), and its report says so.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from models.boxes import BoxFormat, Frame, grounding_prompt, parse_boxes
from models.budget import PruningConfig
from models.embedding_cache import EmbeddingCache
from models.engine import PreparedBatch, VisionLanguageAdapter
from models.geometry import Geometry
from models.plans import CALIBRATED_METHOD, PlanTable
from models.tasks import BatchTimings, Box, TaskRequest, TaskResult, VisualTokenReport

TextCallback = Callable[[int, str], None]
"""Called with (task index, newly decoded text) while a streaming task decodes."""


@dataclass
class PreparedTasks:
    """A batch after the CPU-side preparation, ready for `ModelRunner.execute`."""

    tasks: list[TaskRequest]
    batch: PreparedBatch
    preprocess_s: float
    configs: list[PruningConfig]  # what each task runs with (a calibrated plan resolved, see `resolve_plan`)
    plan_labels: list[str | None]  # the calibrated plan's label per task, None when its own config ran


VQA_SUFFIX = {
    "loc_tokens": "",
    "qwen2_5_vl_json": "",
    "qwen3_vl_json": "",  # the instruct checkpoints answer briefly as asked; no benchmark-style suffix
    "llava_norm": "\nAnswer the question using a single word or phrase.",
}

FAMILY_BOX_FORMAT: dict[str, BoxFormat] = {"qwen2_5_vl": "qwen2_5_vl_json", "qwen3_vl": "qwen3_vl_json"}
"""Each family's native box format (LLaVA-1.5 and anything else: `llava_norm`)."""


def detect_box_format(adapter: VisionLanguageAdapter) -> BoxFormat:
    """Location tokens if the tokenizer has them (our built-in model), else the family's native format."""
    tokenizer = getattr(adapter.processor, "tokenizer", adapter.processor)
    if "<loc_0>" in tokenizer.get_vocab():
        return "loc_tokens"
    return FAMILY_BOX_FORMAT.get(adapter.family, "llava_norm")


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

    @property
    def geometry(self) -> Geometry:
        """Frames and visual-token counts from the image size alone (also sent to the API process)."""
        return self.adapter.geometry

    @property
    def tokenizer(self) -> Any:
        return getattr(self.adapter.processor, "tokenizer", self.adapter.processor)

    @property
    def max_positions(self) -> int:
        """Positions the LLM supports: the unpruned prompt (pruned tokens keep their original positions) plus the
        answer must fit."""
        return int(getattr(self.adapter.text_config, "max_position_embeddings", 0) or 2**31 - 1)

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Every special token of the tokenizer (control tokens, image placeholders, location tokens)."""
        tokenizer = self.tokenizer
        specials = set(tokenizer.all_special_tokens)
        specials.update(
            token.content
            for token in tokenizer.added_tokens_decoder.values()
            if getattr(token, "special", False)
        )
        return tuple(sorted(specials))

    def prompt_overhead_tokens(self) -> dict[str, int]:
        """Per task kind, the prompt's tokens besides the user text and the visual tokens (chat template,
        instruction words, image markers): measured through the real processor on a tiny image."""
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        text = "x"
        text_tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        visual = self.geometry.visual_tokens(image.size)
        overhead = {}
        for kind in ("ground", "answer", "chat"):
            prepared = self.prepare([TaskRequest(image=image, kind=kind, text=text)])  # type: ignore[arg-type]
            length = int(prepared.batch.inputs["attention_mask"][0].sum())
            overhead[kind] = length - visual - text_tokens
        return overhead

    def resolve_plan(
        self, task: TaskRequest, image_size: tuple[int, int] | None = None
    ) -> tuple[PruningConfig, str | None]:
        """The config `task` runs with and its calibrated plan's label (None: its own config, as sent).

        `image_size` is the ORIGINAL image's (w, h) (the worker may hold a shrunken decode); it sets the visual
        token count that a token-count budget is compared with.
        """
        if not self.plans or task.config.method != CALIBRATED_METHOD:
            return task.config, None
        size = image_size or task.image.size  # type: ignore[attr-defined]
        return self.plans.resolve(task.config, task.kind, self.estimate_visual_tokens(size))

    def warmup(self) -> None:
        """One real batched forward (a synthetic scene-like image), so readiness means the device works."""
        image = Image.new("RGB", (96, 64), (230, 230, 230))
        image.paste((220, 30, 30), (20, 16, 44, 40))
        self.run(
            [TaskRequest(image=image, kind="answer", text="What color is the square?", max_new_tokens=2)]
        )

    def prepare(self, tasks: Sequence[TaskRequest]) -> PreparedTasks:
        """The processor's work for a batch (resize, normalise, chat template, tokenise): CPU only."""
        start = time.perf_counter()
        images = [task.image for task in tasks]
        sizes = [task.original_size or task.image.size for task in tasks]  # type: ignore[attr-defined]
        batch = self.adapter.prepare(images, [self.prompt_for(task) for task in tasks], original_sizes=sizes)
        batch.image_keys = [task.image_key for task in tasks]
        if self.adapter.device.type == "cuda":  # pinned host memory: the copy to the device is asynchronous
            batch.inputs = {key: value.pin_memory() for key, value in batch.inputs.items()}
        resolved = [self.resolve_plan(task, size) for task, size in zip(tasks, sizes, strict=True)]
        return PreparedTasks(
            tasks=list(tasks),
            batch=batch,
            preprocess_s=time.perf_counter() - start,
            configs=[config for config, _ in resolved],
            plan_labels=[label for _, label in resolved],
        )

    @torch.inference_mode()
    def execute(
        self,
        prepared: PreparedTasks,
        embedding_cache: EmbeddingCache | None = None,
        cancelled: Callable[[], Collection[int]] | None = None,
        on_text: TextCallback | None = None,
    ) -> tuple[list[TaskResult], BatchTimings]:
        """Run a prepared batch on the device: requests with different images, budgets and methods.

        Args:
            prepared: From `prepare`.
            embedding_cache: Vision outputs of images seen before (hits skip the vision tower).
            cancelled: Indices of tasks to stop decoding (their clients left).
            on_text: Receives each `stream=True` task's text as it is decoded, piece by piece.
        """
        tasks, batch = prepared.tasks, prepared.batch
        tokenizer = self.tokenizer
        streamer = _TextStreamer(tokenizer, [b for b, task in enumerate(tasks) if task.stream], on_text)
        output = self.adapter.generate(
            batch,
            prepared.configs,
            max_new_tokens=[task.max_new_tokens for task in tasks],
            embedding_cache=embedding_cache,
            cancelled=cancelled,
            on_step=streamer.on_step if streamer.active else None,
        )
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
                    report=_labelled(output.reports[b], prepared.plan_labels[b]),
                    frame=frame,
                    prompt_tokens=output.prompt_tokens[b],
                    completion_tokens=len(ids),
                    finish_reason=output.finish_reasons[b],
                    cache=output.cache_status[b],
                )
            )
        timings = output.timings
        return results, BatchTimings(
            preprocess=prepared.preprocess_s,
            vision=timings.get("vision", 0.0),
            prune=timings.get("prune", 0.0),
            prefill=timings.get("prefill", 0.0),
            decode=timings.get("decode", 0.0),
        )

    def run(self, tasks: Sequence[TaskRequest], **options: Any) -> tuple[list[TaskResult], BatchTimings]:
        """`prepare` then `execute` (options go to `execute`)."""
        return self.execute(self.prepare(tasks), **options)

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


class _TextStreamer:
    """Turns each decoding step's token lists into the new text of the streaming tasks.

    The whole sequence is decoded at every step and only what is new is sent, which keeps multi-token characters
    and tokenizer-specific spacing right; text ending in an incomplete UTF-8 sequence (U+FFFD) is held back until
    the next token completes it.
    """

    def __init__(self, tokenizer: Any, indices: Sequence[int], on_text: TextCallback | None) -> None:
        self._tokenizer = tokenizer
        self._indices = list(indices) if on_text is not None else []
        self._on_text = on_text
        self._sent = dict.fromkeys(self._indices, "")
        self._lengths = dict.fromkeys(self._indices, 0)

    @property
    def active(self) -> bool:
        return bool(self._indices)

    def on_step(self, sequences: Sequence[Sequence[int]]) -> None:
        assert self._on_text is not None
        for b in self._indices:
            ids = sequences[b]
            if len(ids) == self._lengths[b]:
                continue  # finished earlier: nothing new
            self._lengths[b] = len(ids)
            text = self._tokenizer.decode(ids, skip_special_tokens=True).lstrip()  # as the final answer is
            if text.endswith("\ufffd"):
                continue
            sent = self._sent[b]
            if text.startswith(sent) and len(text) > len(sent):
                self._on_text(b, text[len(sent) :])
                self._sent[b] = text


def _labelled(report: VisualTokenReport, label: str | None) -> VisualTokenReport:
    """`report` with the calibrated plan's label, when one ran."""
    return report if label is None else dataclasses.replace(report, plan=label)


def _strip_end_tokens(text: str, tokenizer: Any) -> str:
    for token in (tokenizer.eos_token, tokenizer.pad_token):
        if token:
            text = text.replace(token, "")
    return text.strip()


__all__ = ["FAMILY_BOX_FORMAT", "ModelRunner", "detect_box_format"]

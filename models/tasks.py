"""Task-level contract between the serving worker and a model adapter.

The worker hands an adapter a list of `TaskRequest`s (one image + one query each, every request with its own
pruning config) and gets back one `TaskResult` per request plus a `BatchTimings`. Nothing here imports torch, so
the API process can build and inspect these objects without loading the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from models.boxes import Frame
from models.budget import PruningConfig

TaskKind = Literal["ground", "answer", "chat"]


@dataclass(frozen=True)
class TaskRequest:
    """One image + one query.

    Attributes:
        image: a decoded RGB `PIL.Image.Image` (EXIF orientation already applied by the caller).
        kind: "ground" (text is a referring phrase; boxes are parsed), "answer" (text is a question),
            "chat" (text is a free-form user prompt sent as is).
        text: the phrase, question or prompt.
        config: the pruning config of THIS request (method and budget may differ inside one batch).
        max_new_tokens: generation cap for this request.
        image_key: names the image's content (a hash of its bytes) for the embedding cache; None = never cached.
        stream: report the answer's text piece by piece while it is decoded (`ModelRunner.execute(on_text=)`).
        original_size: (width, height) of the image the client sent, when `image` is a reduced decode of it
            (boxes and frames refer to the original); None = `image` is the original.
    """

    image: object
    kind: TaskKind
    text: str
    config: PruningConfig = field(default_factory=PruningConfig)
    max_new_tokens: int = 32
    image_key: str | None = None
    stream: bool = False
    original_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class Box:
    """A box in ORIGINAL image pixels (`xyxy`) and normalised to the original image (`xyxy_norm`)."""

    label: str
    xyxy: tuple[float, float, float, float]
    xyxy_norm: tuple[float, float, float, float]


@dataclass(frozen=True)
class VisualTokenReport:
    """What pruning did to one sample; every number is measured from the run, not from the request.

    Attributes:
        method: the pruning method applied.
        budget: the requested budget (int = average tokens, float = keep ratio, None = keep all).
        original: visual tokens of the unpruned image (N).
        stage1: visual tokens fed to the LLM (K1).
        stage2: visual tokens kept after the LLM-side drop (K2; equals stage1 when nothing is dropped).
        per_layer: visual tokens each LLM layer saw.
        average: mean of `per_layer`.
        grid: (rows, cols) of the visual-token grid.
        kept: (row, col) grid cells of the tokens kept to the end (after stage 2), raster order.
        kept_stage1: (row, col) grid cells fed to the LLM, raster order.
        flops_prefill: theoretical prefill FLOPs with pruning (8SH^2 + 4S^2H + 4SHI per layer).
        flops_prefill_unpruned: the same for the unpruned sequence.
        plan: which split ran: `paper` (the method's published rule), `custom` (plan fields set by hand) or
            `calibrated:<task>@<budget>` (a calibrated plan from the model directory, `models/plans.py`).
    """

    method: str
    budget: int | float | None
    original: int
    stage1: int
    stage2: int
    per_layer: tuple[int, ...]
    average: float
    grid: tuple[int, int]
    kept: tuple[tuple[int, int], ...]
    kept_stage1: tuple[tuple[int, int], ...]
    flops_prefill: float
    flops_prefill_unpruned: float
    plan: str = "paper"


@dataclass(frozen=True)
class TaskResult:
    """The answer to one `TaskRequest`.

    Attributes:
        text: the decoded generated text (special tokens removed, except location tokens for grounding).
        raw_output: the decoded text with special tokens kept (what the model literally emitted).
        boxes: parsed boxes in original pixels, best first (grounding only; empty when none was produced).
        report: the visual-token report.
        frame: where the original image sat in the model input (maps any model-input box or grid cell back).
        prompt_tokens: prompt length in tokens BEFORE pruning (text + visual).
        completion_tokens: generated tokens (up to and including EOS).
        finish_reason: "stop" (EOS), "length" (the token cap) or "cancelled" (the caller gave up).
        cache: "hit" when the vision tower did not run for this image (cached or shared in the batch), else "miss".
    """

    text: str
    raw_output: str
    boxes: tuple[Box, ...]
    report: VisualTokenReport
    frame: Frame
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    cache: str = "miss"

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the original image."""
        return self.frame.original_size

    @property
    def model_input_size(self) -> tuple[int, int]:
        """(width, height) of the image the vision encoder saw."""
        return self.frame.input_size


@dataclass(frozen=True)
class BatchTimings:
    """Seconds spent per stage for a whole batch (every request of the batch shares them)."""

    preprocess: float = 0.0
    vision: float = 0.0
    prune: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.preprocess + self.vision + self.prune + self.prefill + self.decode


__all__ = ["Box", "BatchTimings", "TaskKind", "TaskRequest", "TaskResult", "VisualTokenReport"]

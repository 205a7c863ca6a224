"""Records sent between the API process and the worker process (pickled over multiprocessing pipes).

Named frozen dataclasses, never positional tuples, and never pickled exceptions: a failure crosses the process
boundary as a `WorkerFailure` (status, code, message), so the API renders it without importing the worker's
exception types. No torch here; `PruningConfig` / `TaskResult` come from the torch-free `models` modules.

Images cross as their ENCODED bytes (`ImageBlob`), never as decoded pixels: the worker decodes them, bounded by
what the model will see, so a 12-megapixel JPEG costs the pipe its file size, not 36 MB of pixels.

Two channels per worker, each with exactly one writer on each side (a writer thread; see
`service.worker_process` and `service.worker`), so a message can never be interleaved with another:
    * batch channel: API -> worker `RunBatch` / `Cancel` / `Shutdown`; worker -> API `WorkerReady` /
      `WorkerStartFailed` / `BatchStarted` / `TextDelta` / `BatchDone`.
    * control channel: `PingQuery` -> `PingReply`, answered by a worker thread even while a batch runs.

Timestamps are `time.monotonic()` values, one clock for both processes on the same machine, so the time a message
spent between them (serialisation, the pipe, the peer's reader) is a difference of two stamps.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.budget import PruningConfig
from models.embedding_cache import CacheStats
from models.geometry import Geometry
from models.tasks import BatchTimings, TaskKind, TaskResult


@dataclass(frozen=True)
class ImageBlob:
    """An image as the client sent it, plus what its header said (read in the API without decoding).

    Attributes:
        data: The encoded bytes (PNG, JPEG, WebP, GIF or BMP).
        format: PIL format name from the header.
        size: (width, height) upright, i.e. after the EXIF orientation.
    """

    data: bytes
    format: str
    size: tuple[int, int]


@dataclass(frozen=True)
class WorkItem:
    """One request (one phrase of a several-phrase /ground) inside a batch.

    Attributes:
        request_id: The API's id for this item (several-phrase requests add "#<n>" per phrase).
        kind: "ground", "answer" or "chat".
        text: The phrase, question or prompt.
        config: The pruning config it runs with.
        max_new_tokens: Its generation cap.
        image: The encoded image.
        deadline: `time.monotonic()` after which the worker must not start it.
        stream: Send its text piece by piece (`TextDelta`) while decoding.
    """

    request_id: str
    kind: TaskKind
    text: str
    config: PruningConfig
    max_new_tokens: int
    image: ImageBlob
    deadline: float
    stream: bool = False


@dataclass(frozen=True)
class RunBatch:
    batch_id: int
    items: tuple[WorkItem, ...]
    sent_at: float

    def wire_size_hint(self) -> int:
        """The encoded images' bytes: what decides whether the event loop may pickle this batch itself
        (`service.outbox`)."""
        return sum(len(item.image.data) for item in self.items)


@dataclass(frozen=True)
class Cancel:
    """Stop decoding these requests (their clients left); their answers are no longer wanted."""

    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class Shutdown:
    """Finish nothing more and exit."""


@dataclass(frozen=True)
class BatchStarted:
    """The worker began running a batch on the device (its preparation is done)."""

    batch_id: int
    started_at: float


@dataclass(frozen=True)
class TextDelta:
    """New answer text of a streaming request."""

    request_id: str
    text: str


@dataclass(frozen=True)
class ItemResult:
    """A request the worker answered.

    Attributes:
        request_id: Which request.
        result: The model's answer and visual-token report.
        timings: Seconds per stage of the (sub-)batch this request ran in.
        batch_size: Requests in that (sub-)batch.
        decode_image_s: Seconds the worker spent decoding this request's image.
        wait_s: Seconds its prepared batch waited for the previous batch to finish (pipelining).
    """

    request_id: str
    result: TaskResult
    timings: BatchTimings
    batch_size: int
    decode_image_s: float
    wait_s: float


@dataclass(frozen=True)
class WorkerFailure:
    """A request the worker could not answer, as data: HTTP status, stable code, message."""

    request_id: str
    status: int
    code: str
    message: str


@dataclass(frozen=True)
class BatchDone:
    """A batch's outcomes, in item order, with when the worker received and finished it.

    Attributes:
        batch_id: Which batch.
        outcomes: One result or failure per item.
        received_at: When the worker's reader got the batch off the pipe.
        done_at: When the outcomes were ready to send.
        cache: The embedding cache's counters after this batch (None when it is disabled).
        prepare_s: Seconds the reader thread spent preparing it (decoding, processor).
        run_s: Seconds the main thread spent running it (vision to the last decoding step).
    """

    batch_id: int
    outcomes: tuple[ItemResult | WorkerFailure, ...]
    received_at: float
    done_at: float
    cache: CacheStats | None = None
    prepare_s: float = 0.0
    run_s: float = 0.0


@dataclass(frozen=True)
class WorkerReady:
    """The model is loaded and warmed up with a real forward; what the API needs to admit requests by itself.

    Attributes:
        pid: Worker process id.
        model_name: `ModelRunner.name` (the model directory's name).
        device: `ModelRunner.device`, e.g. "cpu" or "cuda:0".
        load_s: Seconds to load the model.
        warmup_s: Seconds of the warm-up forward.
        family: The adapter's model family (selects published pruning plans).
        geometry: Frames and visual-token counts from an image's size (`models.geometry`).
        num_llm_layers: Decoder layers of the LLM (for planning budgets).
        max_positions: Positions the LLM supports (prompt + visual tokens + answer must fit).
        prompt_overhead_tokens: Per task kind, the prompt's tokens besides the user text and the visual tokens
            (chat template, instruction words, image markers), measured through the real processor.
        tokenizer_file: The tokenizer.json the API may load to count and check user text (None: none found).
        special_tokens: The tokenizer's special tokens, which user text must not contain.
    """

    pid: int
    model_name: str
    device: str
    load_s: float
    warmup_s: float
    family: str
    geometry: Geometry
    num_llm_layers: int
    max_positions: int
    prompt_overhead_tokens: dict[str, int]
    tokenizer_file: str | None
    special_tokens: tuple[str, ...]


@dataclass(frozen=True)
class WorkerStartFailed:
    """The worker could not load or warm up; `message` says what failed, `hint` what to fix (may be empty)."""

    message: str
    hint: str = ""


@dataclass(frozen=True)
class PingQuery:
    query_id: int


@dataclass(frozen=True)
class PingReply:
    """The worker's control thread is alive; what it knows about the device and the running batch.

    Attributes:
        query_id: Which ping.
        ok: The device check passed (always True while a batch runs: the check waits for no model work).
        detail: The device, or what failed.
        busy_s: Seconds the running batch has been running (None when idle).
        steps: Decoding steps completed since the worker started (progress while busy).
    """

    query_id: int
    ok: bool
    detail: str
    busy_s: float | None = None
    steps: int = 0


__all__ = [
    "BatchDone",
    "BatchStarted",
    "Cancel",
    "ImageBlob",
    "ItemResult",
    "PingQuery",
    "PingReply",
    "RunBatch",
    "Shutdown",
    "TextDelta",
    "WorkItem",
    "WorkerFailure",
    "WorkerReady",
    "WorkerStartFailed",
]

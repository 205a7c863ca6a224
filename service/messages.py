"""Records sent between the API process and the worker process (pickled over multiprocessing pipes).

Named frozen dataclasses, never positional tuples, and never pickled exceptions: a failure crosses the process
boundary as a `WorkerFailure` (status, code, message), so the API renders it without importing the worker's
exception types. No torch here; `TaskRequest`/`TaskResult` come from the torch-free `models.tasks`.

Two channels per worker:
    * batch channel: API -> worker `RunBatch` / `Shutdown`; worker -> API `WorkerReady` / `WorkerStartFailed` /
      `BatchDone`. The worker runs one batch at a time.
    * control channel: cheap queries answered by a worker thread even while a batch runs (`EstimateQuery` for
      admission, `PingQuery` for /healthz).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.tasks import BatchTimings, TaskRequest, TaskResult


@dataclass(frozen=True)
class WorkItem:
    """One request inside a batch.

    Attributes:
        request_id: The API's request id (echoed in logs on both sides).
        task: Image + query + pruning config.
        deadline: `time.monotonic()` after which the worker must not start it (same clock in both processes).
    """

    request_id: str
    task: TaskRequest
    deadline: float


@dataclass(frozen=True)
class RunBatch:
    batch_id: int
    items: tuple[WorkItem, ...]


@dataclass(frozen=True)
class Shutdown:
    """Finish nothing more and exit."""


@dataclass(frozen=True)
class ItemResult:
    """A request the worker answered.

    Attributes:
        request_id: Which request.
        result: The model's answer and visual-token report.
        timings: Seconds per stage of the (sub-)batch this request ran in.
        batch_size: Requests in that (sub-)batch.
    """

    request_id: str
    result: TaskResult
    timings: BatchTimings
    batch_size: int


@dataclass(frozen=True)
class WorkerFailure:
    """A request the worker could not answer, as data: HTTP status, stable code, message."""

    request_id: str
    status: int
    code: str
    message: str


@dataclass(frozen=True)
class BatchDone:
    batch_id: int
    outcomes: tuple[ItemResult | WorkerFailure, ...]


@dataclass(frozen=True)
class WorkerReady:
    """The model is loaded and warmed up with a real forward.

    Attributes:
        pid: Worker process id.
        model_name: `ModelRunner.name` (the model directory's name).
        device: `ModelRunner.device`, e.g. "cpu" or "cuda:0".
        load_s: Seconds to load the model.
        warmup_s: Seconds of the warm-up forward.
        fallback_visual_tokens: Estimate used for admission if an estimate query times out (a large image's).
    """

    pid: int
    model_name: str
    device: str
    load_s: float
    warmup_s: float
    fallback_visual_tokens: int


@dataclass(frozen=True)
class WorkerStartFailed:
    message: str


@dataclass(frozen=True)
class EstimateQuery:
    query_id: int
    image_size: tuple[int, int]


@dataclass(frozen=True)
class EstimateReply:
    query_id: int
    visual_tokens: int
    model_input_size: tuple[int, int]
    error: str | None = None


@dataclass(frozen=True)
class PingQuery:
    query_id: int


@dataclass(frozen=True)
class PingReply:
    query_id: int
    ok: bool
    detail: str


__all__ = [
    "BatchDone",
    "EstimateQuery",
    "EstimateReply",
    "ItemResult",
    "PingQuery",
    "PingReply",
    "RunBatch",
    "Shutdown",
    "WorkItem",
    "WorkerFailure",
    "WorkerReady",
    "WorkerStartFailed",
]

"""The worker's two-stage pipeline: one thread prepares batch N+1 while the main thread runs batch N.

    batch pipe --> reader thread: decode images (bounded, several at once), run the processor --> prepared queue
                   main thread:   vision (embedding cache) -> prune -> prefill -> decode --> outbox

Why two threads: decoding images and the processor's resize/normalise/tokenise are CPU work, and the device would
idle through them if they ran between batches. The API keeps at most `pipeline_depth` batches in the worker, so
the reader thread is never blocked and reads `Cancel` messages at once. Only the main thread touches the model
and the embedding cache; every message to the API goes through the one `Outbox`.

Failures stay per request: an image that does not decode fails alone (415), a request past its deadline is
refused before the batch runs (504), and a batch that raises (out of memory, a config the engine refuses) is split
and retried (`service.batching.run_splitting`), so only a request that fails alone gets a `WorkerFailure`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from models.tasks import TaskRequest
from service import spans
from service.batch_decoder import BatchDecoder
from service.batching import run_splitting
from service.errors import NuwaError
from service.messages import (
    BatchDone,
    BatchStarted,
    Cancel,
    ItemResult,
    RunBatch,
    Shutdown,
    TextDelta,
    WorkerFailure,
    WorkItem,
)
from service.outbox import Outbox

if TYPE_CHECKING:
    from models.embedding_cache import EmbeddingCache
    from models.runner import ModelRunner, PreparedTasks

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """What the control thread reports about the main thread (read without locks: plain attributes)."""

    busy_since: float | None = None
    steps: int = 0


@dataclass
class _Prepared:
    """A received batch after the reader thread's work."""

    message: RunBatch
    received_at: float
    ready_at: float
    items: list[WorkItem]  # the items that decoded, in batch order
    tasks: dict[str, TaskRequest] = field(default_factory=dict)  # by request id, image decoded
    whole: PreparedTasks | None = None  # every decoded item prepared together (None: none, or it failed)
    decode_s: dict[str, float] = field(default_factory=dict)
    failures: dict[str, WorkerFailure] = field(default_factory=dict)


@dataclass(frozen=True)
class FaultInjection:
    """TEST ONLY (`NUWA_FAULT_INJECTION`): stall the main thread on requests whose text contains `marker`."""

    marker: str
    seconds: float | None  # None = forever

    @classmethod
    def parse(cls, spec: str | None) -> FaultInjection | None:
        if not spec:
            return None
        kind, _, rest = spec.partition(":")
        if kind == "hang" and rest:
            return cls(marker=rest, seconds=None)
        if kind == "sleep":
            seconds, _, marker = rest.partition(":")
            return cls(marker=marker, seconds=float(seconds))
        raise ValueError(
            f"NUWA_FAULT_INJECTION must be 'hang:<text>' or 'sleep:<seconds>:<text>', got {spec!r}"
        )


class WorkerPipeline:
    """Reads batches from the API, prepares them on a thread, runs them on the calling thread.

    Args:
        runner: The loaded model.
        outbox: The only writer of the batch pipe.
        embedding_cache: Vision outputs by image content (None: disabled).
        cache_namespace: Names the model and processor settings in every cache key.
        fault_injection: Test-only stall (see `FaultInjection`).
        decode_threads: Images decoded at once (`service.batch_decoder`).
    """

    def __init__(
        self,
        runner: ModelRunner,
        outbox: Outbox,
        embedding_cache: EmbeddingCache | None,
        cache_namespace: str,
        fault_injection: FaultInjection | None = None,
        decode_threads: int = 1,
    ) -> None:
        self.runner = runner
        self.outbox = outbox
        self.embedding_cache = embedding_cache
        self.cache_namespace = cache_namespace
        self.fault_injection = fault_injection
        self.progress = Progress()
        self._prepared: queue.SimpleQueue[_Prepared | None] = queue.SimpleQueue()
        geometry = runner.geometry  # the decoder is the reader thread's alone
        self.decoder = BatchDecoder(geometry.decode_size, geometry.resample, decode_threads)
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def serve(self, conn: Connection) -> None:
        """Run until `Shutdown` or until the API process goes away."""
        reader = threading.Thread(target=self._read, args=(conn,), name="nuwa-prepare", daemon=True)
        reader.start()
        try:
            while (prepared := self._prepared.get()) is not None:
                self._run(prepared)
        finally:
            self.decoder.close()

    # ------------------------------------------------------------------ reader thread
    def _read(self, conn: Connection) -> None:
        try:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):  # the API process is gone
                    return
                if isinstance(message, Shutdown):
                    return
                if isinstance(message, Cancel):
                    with self._lock:
                        if len(self._cancelled) > 10_000:  # cancels that arrived after their batch ended
                            self._cancelled.clear()
                        self._cancelled.update(message.request_ids)
                elif isinstance(message, RunBatch):
                    self._prepared.put(self._prepare(message, time.monotonic()))
                else:
                    logger.error("worker ignored an unknown message %s", type(message).__name__)
        finally:
            self._prepared.put(None)

    def _prepare(self, message: RunBatch, received_at: float) -> _Prepared:
        prepared = _Prepared(message, received_at, received_at, [])
        for item in message.items:
            spans.mark(item.request_id, "received")
        for item, decoded in zip(message.items, self.decoder.decode(message.items), strict=True):
            if (exc := decoded.error) is not None:
                if isinstance(exc, NuwaError):
                    failure = WorkerFailure(item.request_id, exc.status_code, exc.code, exc.message)
                else:  # a decoder bug must fail this request, not the worker
                    logger.error("decoding the image of %s failed", item.request_id, exc_info=exc)
                    failure = _failure_of(item, exc)
                prepared.failures[item.request_id] = failure
                continue
            prepared.decode_s[item.request_id] = decoded.seconds
            spans.mark(item.request_id, "decoded")
            prepared.items.append(item)
            prepared.tasks[item.request_id] = self._task(item, decoded.image, decoded.digest)
        if prepared.items:
            try:
                prepared.whole = self.runner.prepare(list(prepared.tasks.values()))
            except Exception:  # leave it to the main thread, which splits and reports per request
                logger.warning("preparing batch %d as a whole failed; it will be split", message.batch_id)
        prepared.ready_at = time.monotonic()
        return prepared

    def _task(self, item: WorkItem, image: object, digest: str) -> TaskRequest:
        return TaskRequest(
            image=image,
            kind=item.kind,
            text=item.text,
            config=item.config,
            max_new_tokens=item.max_new_tokens,
            image_key=f"{self.cache_namespace}:{digest}",
            stream=item.stream,
            original_size=item.image.size,
        )

    # ------------------------------------------------------------------ main thread
    def _run(self, prepared: _Prepared) -> None:
        message = prepared.message
        started = time.monotonic()
        self.outbox.send(BatchStarted(message.batch_id, started))
        for item in message.items:
            spans.mark(item.request_id, "running")
        self.progress.busy_since = started
        outcomes: dict[str, ItemResult | WorkerFailure] = dict(prepared.failures)
        with self._lock:
            cancelled = set(self._cancelled)
        live = []
        for item in prepared.items:
            if item.request_id in cancelled:  # its client left while it waited: do not run it at all
                outcomes[item.request_id] = WorkerFailure(
                    item.request_id, 499, "client_disconnected", "cancelled before the batch started"
                )
            elif item.deadline <= started:
                outcomes[item.request_id] = WorkerFailure(
                    item.request_id, 504, "deadline_exceeded", "the deadline passed before the batch started"
                )
            else:
                live.append(item)
        skipped = sum(1 for item in prepared.items if item.request_id in cancelled)
        if skipped:
            logger.info("batch %d: %d cancelled request(s) skipped", message.batch_id, skipped)
        try:
            self._stall_if_asked(live)
            for outcome in run_splitting(
                lambda batch: self._execute(batch, prepared, started),
                live,
                _failure_of,
                _before_retry,
            ):
                outcomes[outcome.request_id] = outcome
        finally:
            self.progress.busy_since = None
            with self._lock:
                self._cancelled.difference_update(item.request_id for item in message.items)
        for item in message.items:
            spans.mark(item.request_id, "done")
        cache = self.embedding_cache.stats() if self.embedding_cache is not None else None
        self.outbox.send(
            BatchDone(
                batch_id=message.batch_id,
                outcomes=tuple(outcomes[item.request_id] for item in message.items),
                received_at=prepared.received_at,
                done_at=time.monotonic(),
                cache=cache,
                prepare_s=prepared.ready_at - prepared.received_at,
                run_s=time.monotonic() - started,
            )
        )

    def _execute(self, batch: Sequence[WorkItem], prepared: _Prepared, started: float) -> list[ItemResult]:
        if prepared.whole is not None and len(batch) == len(prepared.items):
            ready = prepared.whole
        else:  # a retry after a failure, or only some items are live: prepare exactly these
            ready = self.runner.prepare([prepared.tasks[item.request_id] for item in batch])
        ids = [item.request_id for item in batch]

        def cancelled() -> list[int]:
            self.progress.steps += 1  # called once per decoding step: the progress /healthz reports
            with self._lock:
                return [index for index, request_id in enumerate(ids) if request_id in self._cancelled]

        def on_text(index: int, text: str) -> None:
            self.outbox.send(TextDelta(ids[index], text))

        results, timings = self.runner.execute(
            ready, embedding_cache=self.embedding_cache, cancelled=cancelled, on_text=on_text
        )
        if len(results) != len(batch):
            raise RuntimeError(f"the runner returned {len(results)} results for {len(batch)} requests")
        wait_s = max(0.0, started - prepared.ready_at)
        return [
            ItemResult(
                request_id=item.request_id,
                result=result,
                timings=timings,
                batch_size=len(batch),
                decode_image_s=prepared.decode_s.get(item.request_id, 0.0),
                wait_s=wait_s,
            )
            for item, result in zip(batch, results, strict=True)
        ]

    def _stall_if_asked(self, items: Sequence[WorkItem]) -> None:
        fault = self.fault_injection
        if fault is None or not any(fault.marker in item.text for item in items):
            return
        logger.warning("fault injection: stalling batch for %s s", fault.seconds or "ever")
        if fault.seconds is None:
            threading.Event().wait()
        time.sleep(fault.seconds or 0.0)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or other device) out-of-memory, by type or by the message torch uses."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _failure_of(item: WorkItem, exc: BaseException) -> WorkerFailure:
    if is_out_of_memory(exc):
        logger.error("request %s does not fit in device memory even alone: %s", item.request_id, exc)
        return WorkerFailure(
            item.request_id, 503, "out_of_memory", "the request does not fit in device memory"
        )
    if isinstance(exc, ValueError):
        return WorkerFailure(item.request_id, 422, "invalid_request", str(exc))
    logger.error("request %s failed in the worker", item.request_id, exc_info=exc)
    return WorkerFailure(item.request_id, 500, "worker_error", f"{type(exc).__name__}: {exc}")


def _before_retry(exc: BaseException) -> None:
    if is_out_of_memory(exc):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


__all__ = ["FaultInjection", "Progress", "WorkerPipeline", "is_out_of_memory"]

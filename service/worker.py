"""The worker process: owns the model and the device, runs one batch at a time, answers as data.

Started by the supervisor with multiprocessing "spawn" (safe with CUDA; the API process never imports torch).
Order matters: load the model, run the warm-up forward on a real image, start the control thread, THEN say
`WorkerReady`, so /readyz is only true once a real forward has succeeded on this device.

Failures stay per request: a batch that raises (CUDA out of memory, a config the engine refuses) is split and
retried (`service.batching.run_splitting`), and only a request that fails alone gets a `WorkerFailure`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from service.batching import run_splitting
from service.logs import configure_logging
from service.messages import (
    BatchDone,
    Cell,
    EstimateQuery,
    EstimateReply,
    ItemResult,
    PingQuery,
    PingReply,
    PixelBox,
    RunBatch,
    Shutdown,
    WorkerFailure,
    WorkerReady,
    WorkerStartFailed,
    WorkItem,
)
from service.settings import Settings

logger = logging.getLogger(__name__)


def run_worker(settings: Settings, batch_conn: Connection, ctrl_conn: Connection) -> None:
    """Entry point of the spawned worker process.

    Args:
        settings: The API process's validated settings (pickled into the child).
        batch_conn: Receives `RunBatch`/`Shutdown`; sends `WorkerReady`/`WorkerStartFailed`/`BatchDone`.
        ctrl_conn: Receives `EstimateQuery`/`PingQuery`; the control thread answers them.
    """
    configure_logging(settings.log_level)
    # Ctrl+C in a terminal reaches the whole process group; the API process decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        adapter, ready = _load(settings)
    except Exception as exc:  # any load failure is reported as data, then the process exits non-zero
        logger.exception("worker failed to start")
        _send_quietly(batch_conn, WorkerStartFailed(message=f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    threading.Thread(
        target=_serve_control, args=(adapter, ctrl_conn), name="nuwa-control", daemon=True
    ).start()
    batch_conn.send(ready)
    logger.info(
        "worker ready: model %s on %s (load %.1f s, warm-up %.1f s)",
        ready.model_name,
        ready.device,
        ready.load_s,
        ready.warmup_s,
    )
    while True:
        try:
            message = batch_conn.recv()
        except (EOFError, OSError):  # the API process is gone
            break
        if isinstance(message, Shutdown):
            break
        if isinstance(message, RunBatch):
            outcomes = run_batch(adapter, message.items)
            batch_conn.send(BatchDone(batch_id=message.batch_id, outcomes=tuple(outcomes)))
        else:
            logger.error("worker ignored an unknown message %s", type(message).__name__)
    logger.info("worker exiting")


def _load(settings: Settings) -> tuple[Any, WorkerReady]:
    import torch

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    from models.loading import load_adapter

    started = time.monotonic()
    adapter = load_adapter(settings.model, device=settings.device)
    loaded = time.monotonic()
    adapter.warmup()
    warmed = time.monotonic()
    side = max(1, math.isqrt(settings.max_image_pixels))
    ready = WorkerReady(
        pid=os.getpid(),
        model_name=str(adapter.name),
        device=str(adapter.device),
        load_s=loaded - started,
        warmup_s=warmed - loaded,
        fallback_visual_tokens=int(adapter.estimate_visual_tokens((side, side))),
    )
    return adapter, ready


def run_batch(adapter: Any, items: Sequence[WorkItem]) -> list[ItemResult | WorkerFailure]:
    """Run one batch: refuse items past their deadline, run the rest split-on-failure, keep the input order."""
    now = time.monotonic()
    outcomes: dict[str, ItemResult | WorkerFailure] = {}
    live = []
    for item in items:
        if item.deadline <= now:
            outcomes[item.request_id] = WorkerFailure(
                item.request_id, 504, "deadline_exceeded", "the deadline passed before the batch started"
            )
        else:
            live.append(item)

    def run(batch: Sequence[WorkItem]) -> list[ItemResult]:
        results, timings = adapter.run([item.task for item in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"adapter returned {len(results)} results for {len(batch)} requests")
        return [
            ItemResult(
                request_id=item.request_id,
                result=result,
                timings=timings,
                batch_size=len(batch),
                cells=_kept_cells(adapter, result) if item.want_cells else None,
            )
            for item, result in zip(batch, results, strict=True)
        ]

    for outcome in run_splitting(run, live, _failure_of, _before_retry):
        outcomes[outcome.request_id] = outcome
    return [outcomes[item.request_id] for item in items]


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


def _kept_cells(adapter: Any, result: Any) -> tuple[tuple[Cell, PixelBox], ...]:
    """Original-pixel box of every grid cell kept at stage 1 (stage-2 cells are a subset), for the PNG render."""
    rows, cols = result.report.grid
    to_original = getattr(adapter, "input_to_original", None)
    width, height = result.image_size
    cells = []
    for row, col in result.report.kept_stage1:
        box_norm = (col / cols, row / rows, (col + 1) / cols, (row + 1) / rows)
        if to_original is not None:
            x1, y1, x2, y2 = (float(v) for v in to_original(box_norm, result.image_size))
        else:  # plain resize frame
            x1, y1, x2, y2 = (
                box_norm[0] * width,
                box_norm[1] * height,
                box_norm[2] * width,
                box_norm[3] * height,
            )
        cells.append(((int(row), int(col)), (x1, y1, x2, y2)))
    return tuple(cells)


def _serve_control(adapter: Any, conn: Connection) -> None:
    """Answer admission estimates and health pings while the main thread runs batches."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(message, EstimateQuery):
            reply: EstimateReply | PingReply
            try:
                tokens = int(adapter.estimate_visual_tokens(message.image_size))
                input_size = tuple(int(v) for v in adapter.model_input_size(message.image_size))
                reply = EstimateReply(message.query_id, tokens, (input_size[0], input_size[1]))
            except Exception as exc:
                reply = EstimateReply(message.query_id, 0, (0, 0), error=f"{type(exc).__name__}: {exc}")
        elif isinstance(message, PingQuery):
            ok, detail = _check_device(str(adapter.device))
            reply = PingReply(message.query_id, ok, detail)
        else:
            continue
        if not _send_quietly(conn, reply):
            return


def _check_device(device: str) -> tuple[bool, str]:
    """A tiny real computation on the device: a broken CUDA context fails here, not only in the next batch."""
    import torch

    try:
        values = torch.ones(8, device=device)
        total = float((values * 2).sum().item())
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if total != 16.0:
        return False, f"device arithmetic is wrong (2 * ones(8) summed to {total})"
    return True, device


def _send_quietly(conn: Connection, message: object) -> bool:
    try:
        conn.send(message)
    except (OSError, EOFError):
        return False
    return True


__all__ = ["is_out_of_memory", "run_batch", "run_worker"]

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
from typing import TYPE_CHECKING

from service.batching import run_splitting
from service.logs import configure_logging
from service.messages import (
    BatchDone,
    EstimateQuery,
    EstimateReply,
    ItemResult,
    PingQuery,
    PingReply,
    RunBatch,
    Shutdown,
    WorkerFailure,
    WorkerReady,
    WorkerStartFailed,
    WorkItem,
)
from service.settings import Settings

if TYPE_CHECKING:  # the API process imports this module for `run_worker` and must not load torch
    from models.runner import ModelRunner

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
        runner, ready = _load(settings)
    except Exception as exc:  # any load failure is reported as data, then the process exits non-zero
        logger.exception("worker failed to start")
        _send_quietly(batch_conn, WorkerStartFailed(message=f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    threading.Thread(
        target=_serve_control, args=(runner, ctrl_conn), name="nuwa-control", daemon=True
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
            outcomes = run_batch(runner, message.items)
            batch_conn.send(BatchDone(batch_id=message.batch_id, outcomes=tuple(outcomes)))
        else:
            logger.error("worker ignored an unknown message %s", type(message).__name__)
    logger.info("worker exiting")


def _load(settings: Settings) -> tuple[ModelRunner, WorkerReady]:
    import torch

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    from models.loading import load_runner

    started = time.monotonic()
    runner = load_runner(settings.model, device=settings.device)
    loaded = time.monotonic()
    runner.warmup()
    warmed = time.monotonic()
    side = max(1, math.isqrt(settings.max_image_pixels))
    ready = WorkerReady(
        pid=os.getpid(),
        model_name=runner.name,
        device=runner.device,
        load_s=loaded - started,
        warmup_s=warmed - loaded,
        fallback_visual_tokens=runner.estimate_visual_tokens((side, side)),
    )
    return runner, ready


def run_batch(runner: ModelRunner, items: Sequence[WorkItem]) -> list[ItemResult | WorkerFailure]:
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
        results, timings = runner.run([item.task for item in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"the runner returned {len(results)} results for {len(batch)} requests")
        return [
            ItemResult(request_id=item.request_id, result=result, timings=timings, batch_size=len(batch))
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


def _serve_control(runner: ModelRunner, conn: Connection) -> None:
    """Answer admission estimates and health pings while the main thread runs batches."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(message, EstimateQuery):
            reply: EstimateReply | PingReply
            try:
                tokens = runner.estimate_visual_tokens(message.image_size)
                width, height = runner.frame_for(message.image_size).input_size
                reply = EstimateReply(message.query_id, tokens, (int(width), int(height)))
            except Exception as exc:
                reply = EstimateReply(message.query_id, 0, (0, 0), error=f"{type(exc).__name__}: {exc}")
        elif isinstance(message, PingQuery):
            ok, detail = _check_device(runner.device)
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

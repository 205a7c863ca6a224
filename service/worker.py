"""The worker process: owns the model and the device, answers as data.

Started by the supervisor with multiprocessing "spawn" (safe with CUDA; the API process never imports torch).
Order matters: load the model, run the warm-up forward on a real image, start the control thread, THEN say
`WorkerReady`, so /readyz is only true once a real forward has succeeded on this device. `WorkerReady` also
carries what the API needs to admit requests without asking again: the image geometry, the LLM's depth and
positions, the prompt overhead and the tokenizer's special tokens.

Threads: the main thread runs batches (`service.worker_pipeline`), a reader thread prepares the next batch, and a
control thread answers /healthz pings without waiting for model work: while a batch runs it reports the batch's
age and decoding progress instead of touching the device, and when idle it runs a tiny computation on the device
(on its own CUDA stream, so it never queues behind the model's kernels).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from service import spans
from service.batch_decoder import default_decode_threads
from service.logs import configure_logging
from service.messages import PingQuery, PingReply, WorkerReady, WorkerStartFailed
from service.outbox import Outbox
from service.settings import Settings
from service.worker_pipeline import FaultInjection, Progress, WorkerPipeline

if TYPE_CHECKING:  # the API process imports this module for `run_worker` and must not load torch
    from models.runner import ModelRunner

logger = logging.getLogger(__name__)


def run_worker(settings: Settings, batch_conn: Connection, ctrl_conn: Connection) -> None:
    """Entry point of the spawned worker process.

    Args:
        settings: The API process's validated settings (pickled into the child).
        batch_conn: Receives `RunBatch`/`Cancel`/`Shutdown`; sends everything else (through one `Outbox`).
        ctrl_conn: Receives `PingQuery`; the control thread answers.
    """
    configure_logging(settings.log_level)
    spans.configure(settings.trace_spans_file)
    # Ctrl+C in a terminal reaches the whole process group; the API process decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    outbox = Outbox(batch_conn, "nuwa-worker-send")
    try:
        runner, ready = _load(settings)
    except Exception as exc:  # any load failure is reported as data, then the process exits non-zero
        logger.exception("worker failed to start")
        outbox.send(WorkerStartFailed(message=f"{type(exc).__name__}: {exc}", hint=start_failure_hint(exc)))
        outbox.close()
        raise SystemExit(1) from None
    pipeline = WorkerPipeline(
        runner,
        outbox,
        embedding_cache=_embedding_cache(settings),
        cache_namespace=f"{ready.model_name}:{ready.geometry!r}",
        fault_injection=FaultInjection.parse(settings.fault_injection),
        decode_threads=settings.worker_decode_threads or default_decode_threads(),
    )
    threading.Thread(
        target=_serve_control, args=(runner, ctrl_conn, pipeline.progress), name="nuwa-control", daemon=True
    ).start()
    outbox.send(ready)
    logger.info(
        "worker ready: model %s on %s (load %.1f s, warm-up %.1f s, %d decode threads)",
        ready.model_name,
        ready.device,
        ready.load_s,
        ready.warmup_s,
        pipeline.decoder.threads,
    )
    pipeline.serve(batch_conn)
    outbox.close()
    logger.info("worker exiting")


def _embedding_cache(settings: Settings):  # noqa: ANN202 (torch-side type, imported lazily)
    if settings.embed_cache_bytes <= 0:
        return None
    from models.embedding_cache import EmbeddingCache

    return EmbeddingCache(settings.embed_cache_bytes)


def _load(settings: Settings) -> tuple[ModelRunner, WorkerReady]:
    import torch

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    from models.loading import load_runner, resolve_model_dir

    started = time.monotonic()
    runner = load_runner(settings.model, device=settings.device, fast_paths=settings.fast_paths)
    loaded = time.monotonic()
    runner.warmup()
    warmed = time.monotonic()
    tokenizer_file = resolve_model_dir(settings.model) / "tokenizer.json"
    ready = WorkerReady(
        pid=os.getpid(),
        model_name=runner.name,
        device=runner.device,
        load_s=loaded - started,
        warmup_s=warmed - loaded,
        family=runner.adapter.family,
        geometry=runner.geometry,
        num_llm_layers=runner.adapter.num_llm_layers,
        max_positions=runner.max_positions,
        prompt_overhead_tokens=runner.prompt_overhead_tokens(),
        tokenizer_file=str(tokenizer_file) if Path(tokenizer_file).is_file() else None,
        special_tokens=runner.special_tokens,
    )
    return runner, ready


def start_failure_hint(exc: BaseException) -> str:
    """What to fix, for the failures a first deployment meets."""
    text = str(exc)
    if isinstance(exc, FileNotFoundError) and "config.json" in text:
        return "point NUWA_MODEL at a local model directory that contains config.json (or 'builtin')"
    if "image placeholders but" in text:
        return (
            "the processor's image-token count does not match the vision tower: check processor_config.json "
            "(num_additional_image_tokens, patch_size, vision_feature_select_strategy) against config.json"
        )
    if "unsupported model_type" in text:
        return "NUWA_MODEL must be a LLaVA-1.5, Qwen2.5-VL or Qwen3-VL checkpoint"
    if "out of memory" in text.lower():
        return "the model does not fit on this device: use a larger device, a smaller model or NUWA_DEVICE"
    return "see the traceback logged above"


def _serve_control(runner: ModelRunner, conn: Connection, progress: Progress) -> None:
    """Answer health pings (this thread is the only writer of the control pipe)."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if not isinstance(message, PingQuery):
            continue
        busy_since = progress.busy_since
        if busy_since is not None:  # a batch runs: report its progress rather than queue behind it
            reply = PingReply(
                message.query_id,
                True,
                runner.device,
                busy_s=time.monotonic() - busy_since,
                steps=progress.steps,
            )
        else:
            ok, detail = check_device(runner.device)
            reply = PingReply(message.query_id, ok, detail, steps=progress.steps)
        try:
            conn.send(reply)
        except (OSError, EOFError):
            return


def check_device(device: str) -> tuple[bool, str]:
    """A tiny real computation on the device: a broken CUDA context fails here, not only in the next batch.

    On CUDA it runs on a stream of its own and synchronises only that stream, so it never waits for the
    model's kernels on the default stream.
    """
    import torch

    try:
        if device.startswith("cuda"):
            stream = torch.cuda.Stream(device=device)
            with torch.cuda.stream(stream):
                total = float((torch.ones(8, device=device) * 2).sum().item())
            stream.synchronize()
        else:
            total = float((torch.ones(8) * 2).sum().item())
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if total != 16.0:
        return False, f"device arithmetic is wrong (2 * ones(8) summed to {total})"
    return True, device


__all__ = ["check_device", "run_worker", "start_failure_hint"]

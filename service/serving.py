"""The request pipeline shared by /ground, /answer and /v1/chat/completions, in the order that keeps it cheap.

1. refuse at once while draining or while the worker is not warm (503);
2. get the image bytes (upload, base64, data URL, allow-listed URL) and read ONLY its header (415/413);
3. estimate its visual tokens from (w, h), lower its budget if the queue is long (load-adaptive degradation,
   `service.admission.DegradationPolicy`), and take a queue ticket (429 + Retry-After when full);
4. decode in a thread (off the event loop), queue, and wait for the worker's answer, the deadline (504), or
   the client leaving (dropped from the queue).

Everything is measured here (queue time, image decode, time to first token, end-to-end) and recorded once per
answered request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from fastapi import Request
from PIL import Image

from models.budget import PruningConfig
from models.tasks import TaskKind, TaskRequest
from service.admission import Degradation, DegradationPolicy
from service.errors import BadRequestError, DeadlineExceededError, NuwaError
from service.inputs import (
    ImageProbe,
    decode_base64_image,
    decode_image,
    fetch_image_url,
    is_remote_url,
    probe_image,
)
from service.messages import ItemResult, WorkItem
from service.metrics import ServiceMetrics
from service.parsing import request_timeout_s
from service.settings import Settings
from service.supervisor import Submission, Supervisor

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.1


class ClientGoneError(Exception):
    """The client closed the connection before its answer was ready; nothing can be sent."""


@dataclass(frozen=True)
class Completed:
    """An answered request with everything the response and the metrics need.

    Attributes:
        outcome: The worker's result for this request.
        image: The decoded, upright RGB image (for `?render=png`).
        probe: Header facts of the input image.
        config: The pruning config the request ran with.
        queue_s: Queued → sent to the worker.
        decode_image_s: API-side decode + EXIF transpose.
        ttft_s: Arrival → end of prefill.
        total_s: Arrival → answer available.
        degradation: What load-adaptive degradation changed (None = the request ran with its own budget).
    """

    outcome: ItemResult
    image: Image.Image
    probe: ImageProbe
    config: PruningConfig
    queue_s: float
    decode_image_s: float
    ttft_s: float
    total_s: float
    degradation: Degradation | None = None


def degradation_policy(settings: Settings) -> DegradationPolicy:
    """The degradation policy the settings describe (start 0 = disabled)."""
    return DegradationPolicy(
        start=settings.degrade_queue_start,
        full=settings.degrade_queue_full_depth,
        floor=settings.degrade_floor,
    )


async def image_bytes_of(upload: bytes | None, ref: str | None, settings: Settings) -> bytes:
    """The encoded image from an upload or a reference string (400 when there is none)."""
    if upload is not None:
        return upload
    if ref is None or not ref.strip():
        raise BadRequestError("missing field 'image'", code="missing_field")
    if is_remote_url(ref):
        return await fetch_image_url(
            ref.strip(), settings.image_url_allowlist, settings.max_body_bytes, settings.url_fetch_timeout_s
        )
    return decode_base64_image(ref)


async def run_task(
    request: Request,
    supervisor: Supervisor,
    metrics: ServiceMetrics,
    *,
    kind: TaskKind,
    image_data: bytes,
    text: str,
    config: PruningConfig,
    max_new_tokens: int,
    min_budget: int | float | None = None,
) -> Completed:
    """Admit, decode, queue and await one request (see the module docstring for the order).

    Raises:
        NuwaError: Any refusal or failure, already typed with its HTTP status.
        ClientGoneError: The client disconnected while waiting.
    """
    settings = supervisor.settings
    arrived = float(getattr(request.state, "started_at", time.monotonic()))
    timeout_s = request_timeout_s(request, settings)
    deadline = arrived + timeout_s
    supervisor.check_accepting()
    probe = probe_image(image_data, settings.max_image_pixels)
    try:
        async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
            visual_tokens, _ = await supervisor.estimate(probe.size)
    except TimeoutError:
        metrics.rejections.labels(reason="deadline").inc()
        raise _deadline_error(timeout_s, "before admission") from None
    queue_depth = supervisor.admission.requests
    config, degradation = degradation_policy(settings).apply(config, visual_tokens, queue_depth, min_budget)
    ticket = supervisor.admit(visual_tokens)
    request.state.log_fields = {"estimated_visual_tokens": visual_tokens}
    with supervisor.track():
        submission: Submission | None = None
        try:
            decode_start = time.monotonic()
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    image = await asyncio.to_thread(decode_image, image_data)
            except TimeoutError:
                raise _deadline_error(timeout_s, "while decoding the image") from None
            decode_image_s = time.monotonic() - decode_start
            item = WorkItem(
                request_id=str(getattr(request.state, "request_id", "")),
                task=TaskRequest(
                    image=image, kind=kind, text=text, config=config, max_new_tokens=max_new_tokens
                ),
                deadline=deadline,
            )
            submission = supervisor.submit(item, ticket)
            outcome = await _await_outcome(request, supervisor, submission, deadline, timeout_s)
        except (NuwaError, ClientGoneError) as exc:
            if submission is not None:
                supervisor.withdraw(submission)
            if isinstance(exc, NuwaError) and exc.status_code == 504:
                metrics.rejections.labels(reason="deadline").inc()
            raise
        finally:
            supervisor.admission.release(ticket)
    finished = time.monotonic()
    assert submission is not None
    dispatched = submission.dispatched_at if submission.dispatched_at is not None else finished
    timings = outcome.timings
    ttft = (dispatched - arrived) + timings.preprocess + timings.vision + timings.prune + timings.prefill
    completed = Completed(
        outcome=outcome,
        image=image,
        probe=probe,
        config=config,
        queue_s=max(dispatched - submission.enqueued_at, 0.0),
        decode_image_s=decode_image_s,
        ttft_s=ttft,
        total_s=finished - arrived,
        degradation=degradation,
    )
    result = outcome.result
    metrics.record_result(
        queue_s=completed.queue_s,
        ttft_s=ttft,
        decode_image_s=decode_image_s,
        timings=timings,
        report=result.report,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
    )
    request.state.log_fields = log_fields(completed)
    return completed


async def _await_outcome(
    request: Request, supervisor: Supervisor, submission: Submission, deadline: float, timeout_s: float
) -> ItemResult:
    watcher = asyncio.create_task(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {submission.future, watcher},
            timeout=max(deadline - time.monotonic(), 0.0),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        watcher.cancel()
    if submission.future in done:
        return submission.future.result()
    if watcher in done:
        supervisor.metrics.rejections.labels(reason="client_disconnected").inc()
        stage = "queued" if submission.dispatched_at is None else "running"
        request.state.log_fields = {"client_gone_while": stage}
        logger.info("client of request %s went away while %s; dropped", submission.item.request_id, stage)
        raise ClientGoneError()
    where = "while queued" if submission.dispatched_at is None else "while the model was running it"
    raise _deadline_error(timeout_s, where)


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


def _deadline_error(timeout_s: float, where: str) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"no answer within the request deadline of {timeout_s:.3g} s (expired {where}); "
        "raise X-Request-Timeout (up to NUWA_REQUEST_TIMEOUT_S) or retry later"
    )


def timing_ms(completed: Completed) -> dict[str, float]:
    """The per-stage breakdown of a response, in milliseconds."""
    timings = completed.outcome.timings
    return {
        "queue": round(completed.queue_s * 1000, 3),
        "image_decode": round(completed.decode_image_s * 1000, 3),
        "preprocess": round(timings.preprocess * 1000, 3),
        "vision": round(timings.vision * 1000, 3),
        "prune": round(timings.prune * 1000, 3),
        "prefill": round(timings.prefill * 1000, 3),
        "decode": round(timings.decode * 1000, 3),
        "total": round(completed.total_s * 1000, 3),
    }


def visual_tokens(completed: Completed) -> dict[str, object]:
    """What pruning did, as measured by the engine, plus the budget and method that were asked for."""
    report = completed.outcome.result.report
    return {
        "original": report.original,
        "stage1": report.stage1,
        "stage2": report.stage2,
        "average": round(float(report.average), 3),
        "budget": report.budget,
        "method": report.method,
        "plan": report.plan,
    }


def degradation_out(completed: Completed) -> dict[str, object] | None:
    """The response's `degradation` object, or None when the request ran with its own budget."""
    applied = completed.degradation
    if applied is None:
        return None
    return {
        "requested_budget": applied.requested_budget,
        "applied_budget": applied.applied_budget,
        "floor_budget": applied.floor_budget,
        "queue_depth": applied.queue_depth,
        "level": applied.level,
    }


def log_fields(completed: Completed) -> dict[str, object]:
    """The structured fields of the access log line of an answered request."""
    result = completed.outcome.result
    report = result.report
    timings = completed.outcome.timings
    fields: dict[str, object] = {
        "queue_s": round(completed.queue_s, 6),
        "ttft_s": round(completed.ttft_s, 6),
        "image_decode_s": round(completed.decode_image_s, 6),
        "preprocess_s": round(timings.preprocess, 6),
        "vision_s": round(timings.vision, 6),
        "prune_s": round(timings.prune, 6),
        "prefill_s": round(timings.prefill, 6),
        "decode_s": round(timings.decode, 6),
        "batch_size": completed.outcome.batch_size,
        "pruning_method": report.method,
        "budget": report.budget,
        "visual_tokens_original": report.original,
        "visual_tokens_stage1": report.stage1,
        "visual_tokens_stage2": report.stage2,
        "visual_tokens_average": round(float(report.average), 3),
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "image_size": list(result.image_size),
    }
    if completed.degradation is not None:
        fields["degraded_from_budget"] = completed.degradation.requested_budget
        fields["degradation_level"] = completed.degradation.level
    return fields


__all__ = [
    "ClientGoneError",
    "Completed",
    "degradation_out",
    "degradation_policy",
    "image_bytes_of",
    "log_fields",
    "run_task",
    "timing_ms",
    "visual_tokens",
]

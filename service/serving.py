"""The request path shared by /ground, /answer and /v1/chat/completions, in the order that keeps it cheap.

1. refuse at once while draining or while the worker is not warm (503), and refuse text that holds special
   tokens (422);
2. get the image bytes (upload, base64, data URL, allow-listed URL; all within the request's deadline) and read
   ONLY its header, off the event loop when large (415/413);
3. `Scheduler.submit`: visual tokens from the size, budget and prompt-length checks, load-adaptive degradation,
   a ticket (429 + Retry-After when full), into the queue; the image stays ENCODED (the worker decodes it);
4. wait for the worker's answer, the deadline (504), or the client leaving (dropped, or cancelled in the worker).

Everything is measured here (queue time, IPC, time to first token, end-to-end) and recorded once per answered
request; the per-batch stage times are recorded once per batch by the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import Request

from models.budget import PruningConfig
from service import spans
from service.admission import Degradation
from service.errors import DeadlineExceededError, NuwaError
from service.images import ImageProbe, probe_image
from service.inputs import image_bytes_of
from service.messages import ImageBlob, ItemResult
from service.metrics import ServiceMetrics
from service.offload import Offloader
from service.parsing import request_timeout_s
from service.scheduler import Admitted, RequestSpec, Scheduler, Submission

logger = logging.getLogger(__name__)


class ClientGoneError(Exception):
    """The client closed the connection before its answer was ready; nothing can be sent."""


@dataclass(frozen=True)
class Answered:
    """One answered item (one phrase of a request) and its own timings.

    Attributes:
        outcome: The worker's result.
        queue_s: Queued -> sent to the worker.
        ttft_s: Arrival -> end of prefill.
    """

    outcome: ItemResult
    queue_s: float
    ttft_s: float


@dataclass(frozen=True)
class Completed:
    """An answered request with everything the response and the metrics need.

    Attributes:
        answers: One per text, in request order.
        admitted: What admission decided (config, visual tokens, degradation).
        probe: Header facts of the input image.
        image_data: The encoded image (for `?render=png`).
        total_s: Arrival -> answer available.
    """

    answers: tuple[Answered, ...]
    admitted: Admitted
    probe: ImageProbe
    image_data: bytes
    total_s: float

    @property
    def first(self) -> Answered:
        return self.answers[0]

    @property
    def config(self) -> PruningConfig:
        return self.admitted.config

    @property
    def degradation(self) -> Degradation | None:
        return self.admitted.degradation


@dataclass(frozen=True)
class Started:
    """A request in the queue (or in the worker): what a streaming route reads while it runs."""

    admitted: Admitted
    probe: ImageProbe
    image_data: bytes
    arrived: float
    deadline: float
    timeout_s: float


async def start_request(
    request: Request,
    scheduler: Scheduler,
    offload: Offloader,
    *,
    kind: str,
    texts: Sequence[str],
    text_field: str,
    upload: bytes | None,
    image_ref: str | None,
    config: PruningConfig,
    max_new_tokens: int,
    min_budget: int | float | None = None,
    stream: bool = False,
) -> Started:
    """Steps 1-3 of the module docstring: checked, admitted and queued (raises the refusal as a `NuwaError`)."""
    settings = scheduler.settings
    arrived = float(getattr(request.state, "started_at", time.monotonic()))
    timeout_s = request_timeout_s(request, settings)
    deadline = arrived + timeout_s
    scheduler.check_texts(tuple(texts), text_field)
    data = await image_bytes_of(upload, image_ref, settings, offload, deadline)
    probe = await offload.run(len(data), probe_image, data, settings.max_image_pixels)
    spec = RequestSpec(
        request_id=str(getattr(request.state, "request_id", "")),
        kind=kind,
        texts=tuple(texts),
        config=config,
        max_new_tokens=max_new_tokens,
        image=ImageBlob(data=data, format=probe.format, size=probe.size),
        deadline=deadline,
        min_budget=min_budget,
        stream=stream,
    )
    admitted = scheduler.submit(spec)
    spans.mark(spec.request_id, "queued")
    request.state.log_fields = {"estimated_visual_tokens": admitted.visual_tokens}
    return Started(admitted, probe, data, arrived, deadline, timeout_s)


async def run_request(
    request: Request, scheduler: Scheduler, metrics: ServiceMetrics, started: Started
) -> Completed:
    """Step 4: wait for every item's answer (or the deadline, or the client leaving).

    Raises:
        NuwaError: Any failure, already typed with its HTTP status.
        ClientGoneError: The client disconnected while waiting.
    """
    submissions = started.admitted.submissions
    with scheduler.track():
        try:
            outcomes = await _await_outcomes(request, scheduler, submissions, started)
        except (NuwaError, ClientGoneError) as exc:
            for submission in submissions:
                scheduler.withdraw(submission)
            if isinstance(exc, NuwaError) and exc.status_code == 504:
                metrics.rejections.labels(reason="deadline").inc()
            raise
    return complete(request, metrics, started, submissions, outcomes)


def complete(
    request: Request,
    metrics: ServiceMetrics,
    started: Started,
    submissions: Sequence[Submission],
    outcomes: Sequence[ItemResult],
) -> Completed:
    """The `Completed` of answered submissions; records each item's metrics and the access-log fields."""
    finished = time.monotonic()
    answers = []
    for submission, outcome in zip(submissions, outcomes, strict=True):
        dispatched = submission.dispatched_at if submission.dispatched_at is not None else finished
        timings = outcome.timings
        ttft = (
            (dispatched - started.arrived)
            + submission.ipc_s
            + outcome.wait_s
            + outcome.decode_image_s
            + timings.preprocess
            + timings.vision
            + timings.prune
            + timings.prefill
        )
        answers.append(Answered(outcome, max(dispatched - submission.enqueued_at, 0.0), ttft))
        result = outcome.result
        metrics.record_result(
            queue_s=answers[-1].queue_s,
            ttft_s=ttft,
            decode_image_s=outcome.decode_image_s,
            ipc_s=submission.ipc_s,
            cache=result.cache,
            report=result.report,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )
    completed = Completed(
        answers=tuple(answers),
        admitted=started.admitted,
        probe=started.probe,
        image_data=started.image_data,
        total_s=finished - started.arrived,
    )
    request.state.log_fields = log_fields(completed)
    return completed


async def _await_outcomes(
    request: Request, scheduler: Scheduler, submissions: Sequence[Submission], started: Started
) -> list[ItemResult]:
    futures = [submission.future for submission in submissions]
    watcher = asyncio.create_task(_wait_disconnect(request))
    # One future (one text) is awaited as it is: a gather around it costs a loop turn between answer and route.
    gathered = futures[0] if len(futures) == 1 else asyncio.gather(*futures)
    try:
        done, _ = await asyncio.wait(
            {gathered, watcher},
            timeout=max(started.deadline - time.monotonic(), 0.0),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        watcher.cancel()
    if gathered in done:
        return list(gathered.result()) if len(futures) > 1 else [gathered.result()]
    gathered.cancel()
    first = submissions[0]
    if watcher in done:
        scheduler.metrics.rejections.labels(reason="client_disconnected").inc()
        stage = "queued" if first.dispatched_at is None else "running"
        request.state.log_fields = {"client_gone_while": stage}
        logger.info("client of request %s went away while %s; dropped", first.item.request_id, stage)
        raise ClientGoneError()
    where = "while queued" if first.dispatched_at is None else "while the model was running it"
    raise deadline_error(started.timeout_s, where)


async def _wait_disconnect(request: Request) -> None:
    """Return when the client goes away, without polling.

    The route has read the whole body by now, so the server's `receive` only wakes for `http.disconnect`
    (uvicorn answers it at once when the connection drops). Polling `Request.is_disconnected` every 100 ms
    instead cost a quarter of the event loop's busy time on sequential requests, and a timer per waiting request
    under load.
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass


def deadline_error(timeout_s: float, where: str) -> DeadlineExceededError:
    return DeadlineExceededError(
        f"no answer within the request deadline of {timeout_s:.3g} s (expired {where}); "
        "raise X-Request-Timeout (up to NUWA_REQUEST_TIMEOUT_S) or retry later"
    )


def timing_ms(completed: Completed, answer: Answered | None = None) -> dict[str, float]:
    """The per-stage breakdown of a response (of one phrase's answer), in milliseconds."""
    answer = answer or completed.first
    outcome = answer.outcome
    timings = outcome.timings
    return {
        "queue": round(answer.queue_s * 1000, 3),
        "ipc": round(_ipc_of(completed, answer) * 1000, 3),
        "image_decode": round(outcome.decode_image_s * 1000, 3),
        "preprocess": round(timings.preprocess * 1000, 3),
        "wait": round(outcome.wait_s * 1000, 3),
        "vision": round(timings.vision * 1000, 3),
        "prune": round(timings.prune * 1000, 3),
        "prefill": round(timings.prefill * 1000, 3),
        "decode": round(timings.decode * 1000, 3),
        "total": round(completed.total_s * 1000, 3),
    }


def _ipc_of(completed: Completed, answer: Answered) -> float:
    for submission, candidate in zip(completed.admitted.submissions, completed.answers, strict=True):
        if candidate is answer:
            return submission.ipc_s
    return 0.0


def visual_tokens(completed: Completed, answer: Answered | None = None) -> dict[str, object]:
    """What pruning did, as measured by the engine, plus the budget and method that were asked for."""
    report = (answer or completed.first).outcome.result.report
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
    """The structured fields of the access log line of an answered request (its first item's stages)."""
    answer = completed.first
    result = answer.outcome.result
    report = result.report
    timings = answer.outcome.timings
    fields: dict[str, object] = {
        "queue_s": round(answer.queue_s, 6),
        "ttft_s": round(answer.ttft_s, 6),
        "ipc_s": round(_ipc_of(completed, answer), 6),
        "image_decode_s": round(answer.outcome.decode_image_s, 6),
        "preprocess_s": round(timings.preprocess, 6),
        "vision_s": round(timings.vision, 6),
        "prune_s": round(timings.prune, 6),
        "prefill_s": round(timings.prefill, 6),
        "decode_s": round(timings.decode, 6),
        "batch_size": answer.outcome.batch_size,
        "cache": result.cache,
        "items": len(completed.answers),
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
    "Answered",
    "ClientGoneError",
    "Completed",
    "Started",
    "complete",
    "deadline_error",
    "degradation_out",
    "log_fields",
    "run_request",
    "start_request",
    "timing_ms",
    "visual_tokens",
]

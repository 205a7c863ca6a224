"""The one owner of admission, the queue and the batches in the worker: a request passes here once.

    route -> serving.run_request -> Scheduler.submit -----------> PendingQueue --collect_batch--> worker
                                   (estimate, checks, admit)                    <--BatchDone--  (supervisor)

* `submit` does everything a request needs before it waits, in one place and without asking the worker:
  visual tokens and the model input frame from the image size (`models.geometry`, sent once in `WorkerReady`),
  a budget the method can reach on this image (422 otherwise), plain text that fits the model's positions
  (`service.text_guard`), load-adaptive degradation, and a ticket (429 when the queue is full in requests,
  visual tokens or image bytes).
* Batches go out as soon as the worker is idle; while it is busy, requests gather until a batch is full, the
  oldest waited `max_wait_ms`, or the running batch ends (`service.batching.collect_batch`). Up to
  `pipeline_depth` batches are in the worker at once, so it prepares the next batch while one runs.
* A batch that runs longer than `batch_timeout` fails its requests with 503 `worker_stuck`, and the worker is
  killed and replaced (the watchdog); a dead worker fails everything it held with 503 `worker_died`.
* A client that leaves (or a deadline that passes) removes its request from the queue, or, once sent, cancels
  it in the worker, whose decoding then stops for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from models.budget import PruningConfig, plan_tokens, target_tokens
from models.embedding_cache import CacheStats
from models.methods import get_method
from service import spans
from service.admission import Admission, Degradation, DegradationPolicy, Ticket
from service.batching import (
    FollowUps,
    Notifier,
    PendingItem,
    PendingQueue,
    collect_batch,
    hold_until,
    split_expired,
)
from service.errors import (
    DeadlineExceededError,
    NuwaError,
    QueueFullError,
    UnavailableError,
    ValidationFailedError,
)
from service.messages import (
    BatchDone,
    BatchStarted,
    Cancel,
    ImageBlob,
    ItemResult,
    RunBatch,
    TextDelta,
    WorkerFailure,
    WorkerReady,
    WorkItem,
)
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.supervisor import Supervisor, WorkerState
from service.text_guard import TextGuard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestSpec:
    """One request as the route parsed it (several texts = several phrases of one /ground).

    Attributes:
        request_id: The HTTP request's id.
        kind: "ground", "answer" or "chat".
        texts: The phrase(s), question or prompt (already stripped and length-checked).
        config: The pruning config asked for (defaults filled in).
        max_new_tokens: Generation cap.
        image: The encoded image and its header facts.
        deadline: `time.monotonic()` by which the answer is due.
        min_budget: The request's floor for degradation (None = the server's floor).
        stream: Stream the answer's text.
    """

    request_id: str
    kind: str
    texts: tuple[str, ...]
    config: PruningConfig
    max_new_tokens: int
    image: ImageBlob
    deadline: float
    min_budget: int | float | None = None
    stream: bool = False


@dataclass(eq=False)
class Submission:
    """One queued or running item; `future` resolves to an `ItemResult` or raises a `NuwaError`."""

    item: WorkItem
    ticket: Ticket
    future: asyncio.Future[ItemResult]
    pending: PendingItem[Submission] | None = None
    enqueued_at: float = 0.0
    dispatched_at: float | None = None
    ipc_s: float = 0.0
    text: asyncio.Queue[str] | None = None


@dataclass(frozen=True)
class Admitted:
    """What `submit` decided for a request: its items (one per text) and how they will run."""

    submissions: tuple[Submission, ...]
    config: PruningConfig
    visual_tokens: int
    model_input_size: tuple[int, int]
    degradation: Degradation | None


@dataclass(eq=False)
class _Flight:
    batch_id: int
    submissions: list[Submission]
    sent_at: float
    started_at: float | None = None
    watchdog: asyncio.TimerHandle | None = None


@dataclass
class _Load:
    """What /readyz reports about the load."""

    queued_requests: int = 0
    queued_visual_tokens: int = 0
    batches_in_worker: int = 0
    requests_in_worker: int = 0
    oldest_batch_s: float | None = None


class Scheduler:
    """Admission + queue + dispatch + routing of answers (see the module docstring).

    Args:
        settings: Service settings.
        metrics: Where queue, batch and request metrics are recorded.
        supervisor: Owner of the worker process (this scheduler becomes its listener).
    """

    def __init__(self, settings: Settings, metrics: ServiceMetrics, supervisor: Supervisor) -> None:
        self.settings = settings
        self.metrics = metrics
        self.supervisor = supervisor
        supervisor.listener = self
        self.admission = Admission(
            settings.max_queue_requests,
            settings.max_queue_visual_tokens,
            settings.retry_after_s,
            on_change=metrics.set_queue_depth,
            max_image_bytes=settings.max_queue_image_bytes,
        )
        self.degradation = DegradationPolicy(
            start=settings.degrade_queue_start,
            full=settings.degrade_queue_full_depth,
            floor=settings.degrade_floor,
        )
        self.queue: PendingQueue[Submission] = PendingQueue()
        self.draining = False
        self._stopping = False
        self._guard: TextGuard | None = None
        self._flights: dict[int, _Flight] = {}
        self._flights_changed = Notifier()
        self._by_request: dict[str, Submission] = {}
        self._batch_ids = itertools.count(1)
        self._active = 0
        self._last_cache: CacheStats | None = None
        self._timing = BatchTiming()
        self._follow_ups = FollowUps(wait_s=settings.max_wait_s)
        self._dispatcher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="nuwa-dispatcher")

    @property
    def ready(self) -> bool:
        """Worker loaded and warm, and not draining: what /readyz reports."""
        return self.supervisor.state is WorkerState.READY and not self.draining and not self._stopping

    def load(self) -> _Load:
        now = time.monotonic()
        starts = [flight.sent_at for flight in self._flights.values()]
        return _Load(
            queued_requests=self.admission.requests,
            queued_visual_tokens=self.admission.visual_tokens,
            batches_in_worker=len(self._flights),
            requests_in_worker=sum(len(flight.submissions) for flight in self._flights.values()),
            oldest_batch_s=round(now - min(starts), 3) if starts else None,
        )

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking requests and wait up to `timeout_s` for admitted ones to finish; True when all did."""
        self.draining = True
        logger.info("draining: %d request(s) in progress, up to %.1f s", self._active, timeout_s)
        deadline = time.monotonic() + timeout_s
        while self._active > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        drained = self._active == 0
        if not drained:
            logger.warning("drain timeout: failing %d unfinished request(s)", self._active)
            self._fail_all(UnavailableError("the server is shutting down", code="shutting_down"))
        return drained

    async def stop(self) -> None:
        """Stop dispatching, fail whatever is left, stop the worker."""
        self._stopping = True
        self.draining = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        self._fail_all(UnavailableError("the server is shutting down", code="shutting_down"))
        await self.supervisor.stop()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a request as in progress (drain waits for these)."""
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

    # ------------------------------------------------------------------ the request path
    def check_accepting(self) -> WorkerReady:
        """Refuse early (503) while draining or while no warm worker exists; else what the worker said."""
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.draining or self._stopping:
            self.metrics.rejections.labels(reason="shutting_down").inc()
            raise UnavailableError("the server is shutting down", code="shutting_down", headers=retry)
        ready = self.supervisor.last_ready
        if self.supervisor.state is not WorkerState.READY or ready is None:
            self.metrics.rejections.labels(reason="worker_not_ready").inc()
            raise UnavailableError(
                f"the model worker is {self.supervisor.state.value}; retry shortly",
                code="worker_not_ready",
                headers=retry,
            )
        return ready

    def check_texts(self, texts: tuple[str, ...], field: str) -> None:
        """422 when any text holds a special token of the model's tokenizer (needs a ready worker)."""
        self.check_accepting()
        guard = self._guard
        if guard is not None:
            for text in texts:
                guard.check_plain(text, field)

    def submit(self, spec: RequestSpec) -> Admitted:
        """Admit and queue a request (see the module docstring); raises the refusal as a `NuwaError`."""
        ready = self.check_accepting()
        try:
            visual_tokens = ready.geometry.visual_tokens(spec.image.size)
            frame = ready.geometry.frame(spec.image.size)
        except ValueError as exc:
            raise ValidationFailedError(
                f"the model cannot take this image: {exc}", code="unsupported_image"
            ) from None
        config = _without_ignored_budget(spec.config)
        _check_reachable(config, visual_tokens, ready, frame.input_size)
        guard = self._guard
        if guard is not None:
            for text in spec.texts:
                guard.check_length(spec.kind, text, visual_tokens, spec.max_new_tokens)
        config, degradation = self.degradation.apply(
            config, visual_tokens, self.admission.requests, spec.min_budget
        )
        tickets = self._admit(visual_tokens, spec.image, len(spec.texts))
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        submissions = []
        for index, (text, ticket) in enumerate(zip(spec.texts, tickets, strict=True)):
            request_id = spec.request_id if len(spec.texts) == 1 else f"{spec.request_id}#{index}"
            item = WorkItem(
                request_id=request_id,
                kind=spec.kind,  # type: ignore[arg-type]
                text=text,
                config=config,
                max_new_tokens=spec.max_new_tokens,
                image=spec.image,
                deadline=spec.deadline,
                stream=spec.stream,
            )
            submission = Submission(item=item, ticket=ticket, future=loop.create_future(), enqueued_at=now)
            if spec.stream:
                submission.text = asyncio.Queue()
            pending = PendingItem(
                payload=submission, enqueued_at=now, deadline=spec.deadline, cost=visual_tokens
            )
            submission.pending = pending
            self._by_request[request_id] = submission
            self.queue.put(pending)
            self._follow_ups.arrived(now)
            submissions.append(submission)
        self.metrics.queue_image_bytes.set(self.admission.image_bytes)
        return Admitted(tuple(submissions), config, visual_tokens, frame.input_size, degradation)

    def _admit(self, visual_tokens: int, image: ImageBlob, count: int) -> list[Ticket]:
        """One ticket per text; the image's bytes are counted once (they are shared)."""
        tickets: list[Ticket] = []
        try:
            for index in range(count):
                tickets.append(self.admission.try_admit(visual_tokens, len(image.data) if index == 0 else 0))
        except QueueFullError as exc:
            for ticket in tickets:
                self.admission.release(ticket)
                self.admission.release_bytes(ticket)
            self.metrics.rejections.labels(reason=exc.code).inc()
            raise
        return tickets

    def withdraw(self, submission: Submission) -> None:
        """The client left or its deadline passed: drop it from the queue, or cancel it in the worker."""
        if submission.pending is not None:
            self.queue.remove(submission.pending)
            submission.pending = None
        elif submission.dispatched_at is not None and not submission.future.done():
            worker = self.supervisor.worker
            if worker is not None:
                worker.send(Cancel((submission.item.request_id,)))
        self._finish(submission)
        if not submission.future.done():
            submission.future.cancel()

    def _finish(self, submission: Submission) -> None:
        self.admission.release(submission.ticket)
        self.admission.release_bytes(submission.ticket)
        self._by_request.pop(submission.item.request_id, None)
        self.metrics.queue_image_bytes.set(self.admission.image_bytes)

    # ------------------------------------------------------------------ dispatch
    async def _dispatch_loop(self) -> None:
        depth = self.settings.pipeline_depth
        while not self._stopping:
            await self.supervisor.ready_event.wait()
            if len(self._flights) >= depth:
                await self._flights_changed.wait()
                continue
            pending = await collect_batch(
                self.queue,
                self.settings.max_batch_size,
                self.settings.max_wait_s,
                busy=lambda: bool(self._flights),
                busy_changed=self._flights_changed,
                max_cost=self.settings.max_batch_visual_tokens,
                leave_at=self._next_batch_leaves_at,
                hold=self._hold_for_follow_ups if self.settings.hold_for_follow_ups else None,
            )
            try:
                self._dispatch(pending)
            except Exception:  # a bug here must not leave every later request hanging until its deadline
                logger.exception("dispatching a batch of %d failed", len(pending))
                for entry in pending:
                    self._resolve(entry.payload, NuwaError("internal error while dispatching the batch"))

    def _dispatch(self, pending: list[PendingItem[Submission]]) -> None:
        """Send one collected batch to the worker (dropping expired items) and arm its watchdog."""
        for entry in pending:
            entry.payload.pending = None
        worker = self.supervisor.worker
        if worker is None:
            for entry in pending:
                self._resolve(entry.payload, UnavailableError("the model worker died", code="worker_died"))
            return
        live, expired = split_expired(pending, time.monotonic())
        for entry in expired:  # counted as rejections{reason="deadline"} by the request path
            self._resolve(
                entry.payload, DeadlineExceededError("the deadline passed while the request was queued")
            )
        if not live:
            return
        now = time.monotonic()
        submissions = []
        for entry in live:
            submission = entry.payload
            submission.dispatched_at = now
            spans.mark(submission.item.request_id, "dispatched")
            self.admission.release(submission.ticket)
            submissions.append(submission)
        batch_id = next(self._batch_ids)
        flight = _Flight(batch_id, submissions, sent_at=now)
        flight.watchdog = asyncio.get_running_loop().call_later(
            self.settings.batch_timeout, self._batch_stuck, batch_id
        )
        self._flights[batch_id] = flight
        self.metrics.batch_size.observe(len(submissions))
        self._update_running()
        worker.send(RunBatch(batch_id, tuple(s.item for s in submissions), sent_at=now))

    def _next_batch_leaves_at(self) -> float | None:
        """When the next batch should be sent: the expected end of the batches already in the worker, less the
        time the worker needs to receive and prepare a batch, so the preparation overlaps the running batch
        (None: not known yet)."""
        if not self._flights:
            return None
        lead_s = self._timing.lead_s
        ends: float | None = None
        for flight in sorted(self._flights.values(), key=lambda f: f.sent_at):
            run_s = self._timing.run_s(len(flight.submissions))
            if run_s is None:
                return None
            started = flight.started_at if flight.started_at is not None else flight.sent_at + lead_s
            ends = max(started, ends if ends is not None else started) + run_s
        return None if ends is None else ends - lead_s

    def _hold_for_follow_ups(self, queued: int) -> float | None:
        """`batching.hold_until` with the worker's state now."""
        size = self.settings.max_batch_size
        return hold_until(self._follow_ups, queued, size, bool(self._flights), time.monotonic())

    def _update_running(self) -> None:
        self.metrics.requests_running.set(sum(len(f.submissions) for f in self._flights.values()))

    def _batch_stuck(self, batch_id: int) -> None:
        flight = self._flights.get(batch_id)
        if flight is None:
            return
        bound = self.settings.batch_timeout
        logger.error(
            "batch %d of %d request(s) ran past %.0f s; restarting the worker",
            batch_id,
            len(flight.submissions),
            bound,
        )
        error = UnavailableError(
            f"the model worker did not finish the batch within {bound:g} s (NUWA_BATCH_TIMEOUT_S); it is being "
            "restarted, retry shortly",
            code="worker_stuck",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )
        self.metrics.rejections.labels(reason="worker_stuck").inc()
        self._fail_flights(error)
        self.supervisor.kill(f"batch {batch_id} exceeded NUWA_BATCH_TIMEOUT_S ({bound:g} s)")

    # ------------------------------------------------------------------ from the supervisor
    def on_worker_ready(self, ready: WorkerReady) -> None:
        try:
            self._guard = TextGuard(ready)
        except Exception:  # an unreadable tokenizer.json must not stop serving: text is then counted by bytes
            logger.exception(
                "could not load %s for text checks; counting text by bytes", ready.tokenizer_file
            )
            self._guard = TextGuard(_without_tokenizer(ready))

    def on_batch_started(self, message: BatchStarted) -> None:
        flight = self._flights.get(message.batch_id)
        if flight is not None:
            flight.started_at = message.started_at

    def on_text(self, message: TextDelta) -> None:
        submission = self._by_request.get(message.request_id)
        if submission is not None and submission.text is not None:
            submission.text.put_nowait(message.text)

    def on_batch_done(self, message: BatchDone) -> None:
        delivered = time.monotonic()
        flight = self._flights.pop(message.batch_id, None)
        if flight is None:
            return  # already failed by the watchdog
        if flight.watchdog is not None:
            flight.watchdog.cancel()
        self._update_running()
        self._follow_ups.completed(delivered)
        self._flights_changed.notify()
        ipc_s = max(0.0, message.received_at - flight.sent_at) + max(0.0, delivered - message.done_at)
        self._timing.observe(len(flight.submissions), message.run_s, message.prepare_s + ipc_s / 2)
        if message.cache is not None:
            self.metrics.record_cache(message.cache, self._last_cache)
            self._last_cache = message.cache
        seen_timings: set[int] = set()
        by_id = {s.item.request_id: s for s in flight.submissions}
        for outcome in message.outcomes:
            submission = by_id.pop(outcome.request_id, None)
            if submission is None:
                continue
            submission.ipc_s = ipc_s
            spans.mark(outcome.request_id, "delivered")
            if isinstance(outcome, WorkerFailure):
                self._resolve(submission, _error_of(outcome, self.settings.retry_after_s))
                continue
            if id(outcome.timings) not in seen_timings:
                seen_timings.add(id(outcome.timings))
                self.metrics.record_batch(outcome.timings)
            self._resolve(submission, outcome)
        for submission in by_id.values():  # nothing accepted is silently dropped
            self._resolve(submission, NuwaError("the worker returned no answer for this request"))

    def on_worker_lost(self, error: NuwaError) -> None:
        self._fail_all(error)

    # ------------------------------------------------------------------ answers
    def _resolve(self, submission: Submission, outcome: ItemResult | NuwaError) -> None:
        self._finish(submission)
        future = submission.future
        if submission.text is not None:
            submission.text.put_nowait("")  # wakes a streaming reader: the answer is ready
        if future.done():
            return
        if isinstance(outcome, NuwaError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def _fail_flights(self, error: NuwaError) -> None:
        for flight in list(self._flights.values()):
            if flight.watchdog is not None:
                flight.watchdog.cancel()
            for submission in flight.submissions:
                self._resolve(submission, error)
        self._flights.clear()
        self._update_running()
        self._flights_changed.notify()

    def _fail_all(self, error: NuwaError) -> None:
        """Answer every queued and in-worker request with `error` (worker death, shutdown)."""
        for entry in self.queue.take_all():
            entry.payload.pending = None
            self._resolve(entry.payload, error)
        self._fail_flights(error)


class BatchTiming:
    """Moving averages of how long the worker takes to run a batch of each size, and to receive and prepare one.

    Why: the next batch should leave just early enough that its preparation ends when the running batch does;
    sent earlier it would be smaller than it could have been (requests still arriving), sent later the device
    would wait. Exponential averages (weight `alpha`) follow the load; an unseen size is estimated from the
    nearest seen one, in proportion to the size.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self._run_s: dict[int, float] = {}
        self._lead_s: float | None = None

    @property
    def lead_s(self) -> float:
        return self._lead_s or 0.0

    def observe(self, size: int, run_s: float, lead_s: float) -> None:
        if size < 1 or run_s <= 0:
            return
        old = self._run_s.get(size)
        self._run_s[size] = run_s if old is None else old + self.alpha * (run_s - old)
        self._lead_s = lead_s if self._lead_s is None else self._lead_s + self.alpha * (lead_s - self._lead_s)

    def run_s(self, size: int) -> float | None:
        if size in self._run_s:
            return self._run_s[size]
        if not self._run_s:
            return None
        nearest = min(self._run_s, key=lambda known: abs(known - size))
        return self._run_s[nearest] * size / nearest


def _without_ignored_budget(config: PruningConfig) -> PruningConfig:
    """A method that keeps every token ignores the budget: do not echo one it did not use."""
    if config.budget is not None and not get_method(config.method).prunes:
        return PruningConfig(**{**config.model_dump(), "budget": None})
    return config


def _check_reachable(
    config: PruningConfig, visual_tokens: int, ready: WorkerReady, input_size: tuple[int, int]
) -> None:
    """422 `budget_unreachable` when the method cannot get down to the requested average on this image."""
    target = target_tokens(config, visual_tokens)
    if target is None or not get_method(config.method).prunes:
        return
    grid = _grid_of(ready, input_size, visual_tokens)
    smallest = plan_tokens(
        PruningConfig(**{**config.model_dump(), "budget": 1}),
        visual_tokens,
        ready.num_llm_layers,
        grid,
        ready.family,  # type: ignore[arg-type]
    ).average
    if smallest > target + 1e-9:
        share = 100 * smallest / visual_tokens
        raise ValidationFailedError(
            f"method {config.method!r} cannot reach an average of {target} visual tokens on this image "
            f"({visual_tokens} visual tokens, {ready.num_llm_layers} LLM layers): the smallest it reaches is "
            f"{smallest:.1f} ({share:.1f}%); ask for at least that, or use method 'nuwa'",
            code="budget_unreachable",
        )


def _grid_of(ready: WorkerReady, input_size: tuple[int, int], visual_tokens: int) -> tuple[int, int]:
    geometry = ready.geometry
    grid = getattr(geometry, "grid", None)
    if grid is not None:
        return grid
    factor = geometry.factor  # type: ignore[union-attr]
    return input_size[1] // factor, input_size[0] // factor


def _without_tokenizer(ready: WorkerReady) -> WorkerReady:
    from dataclasses import replace

    return replace(ready, tokenizer_file=None)


def _error_of(failure: WorkerFailure, retry_after_s: int) -> NuwaError:
    """The typed error of a worker's failure record (status and code travel as data)."""
    error = NuwaError(failure.message, code=failure.code)
    error.status_code = failure.status
    if failure.status in (429, 503):
        error.headers = {"Retry-After": str(retry_after_s)}
    return error


__all__ = ["Admitted", "BatchTiming", "RequestSpec", "Scheduler", "Submission"]

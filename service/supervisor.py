"""API-side owner of the worker: spawn, dispatch batches, route answers, watch liveness, restart, drain.

Shape (one worker process, one batch in flight):

    routes --submit--> PendingQueue --collect_batch--> dispatcher --RunBatch--> worker
                                                                  <--BatchDone--  (reader thread)

* The dispatcher collects a batch only when the worker is idle, so requests keep accumulating (and stay
  cancellable) in the queue while a batch runs; under load batches fill up by themselves.
* The worker process itself (spawn, pipes, reader thread) is `service.worker_process.WorkerProcess`; its reader
  thread watches the pipes AND the process sentinel, so a dead worker is noticed at once: every queued and
  in-flight request gets a 503 answer immediately, readiness drops, a new worker is spawned (with backoff when
  it dies during start-up), and readiness returns after its warm-up forward.
* Everything here runs on the event loop; the reader thread hands messages over with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import multiprocessing as mp
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from service.admission import Admission, Ticket
from service.batching import PendingItem, PendingQueue, collect_batch, split_expired
from service.errors import (
    DeadlineExceededError,
    NuwaError,
    QueueFullError,
    UnavailableError,
    ValidationFailedError,
)
from service.messages import (
    BatchDone,
    EstimateQuery,
    EstimateReply,
    ItemResult,
    PingQuery,
    PingReply,
    RunBatch,
    WorkerFailure,
    WorkerReady,
    WorkerStartFailed,
    WorkItem,
)
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.worker_process import WorkerProcess

logger = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 5.0
"""How long an estimate or ping may take before the worker counts as unresponsive for it."""
_ESTIMATE_CACHE_SIZE = 4096


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPED = "stopped"


@dataclass(eq=False)
class Submission:
    """A request between admission and its answer; `future` resolves to an `ItemResult` or a `NuwaError`."""

    item: WorkItem
    ticket: Ticket
    future: asyncio.Future[ItemResult]
    pending: PendingItem[Submission] | None = None
    enqueued_at: float = 0.0
    dispatched_at: float | None = None


@dataclass(eq=False)
class _InFlight:
    submissions: list[Submission]
    done: asyncio.Future[BatchDone | None]
    incarnation: int


class Supervisor:
    """Runs the worker and the queue in front of it; one instance per app, created in the lifespan.

    Args:
        settings: Service settings (also pickled into the worker).
        metrics: Where batch, queue and worker metrics are recorded.
    """

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.admission = Admission(
            settings.max_queue_requests,
            settings.max_queue_visual_tokens,
            settings.retry_after_s,
            on_change=metrics.set_queue_depth,
        )
        self.queue: PendingQueue[Submission] = PendingQueue()
        self.state = WorkerState.STARTING
        self.draining = False
        self.restarts = 0
        self.last_error: str | None = None
        self.last_ready: WorkerReady | None = None
        self._stopping = False
        self._ctx = mp.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inc: WorkerProcess | None = None
        self._numbers = itertools.count(1)
        self._batch_ids = itertools.count(1)
        self._query_ids = itertools.count(1)
        self._inflight: dict[int, _InFlight] = {}
        self._queries: dict[int, asyncio.Future[Any]] = {}
        self._estimates: OrderedDict[tuple[int, int], tuple[int, tuple[int, int]]] = OrderedDict()
        self._ready_event = asyncio.Event()
        self._active = 0
        self._start_failures = 0
        self._dispatcher: asyncio.Task[None] | None = None
        self._respawn_handle: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Spawn the worker and the dispatcher; returns at once (readiness comes later, see `ready`)."""
        self._loop = asyncio.get_running_loop()
        self.metrics.worker_ready.set(0)
        self._spawn()
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="nuwa-dispatcher")

    @property
    def ready(self) -> bool:
        """Worker loaded and warm, and not draining: what /readyz reports."""
        return self.state is WorkerState.READY and not self.draining and not self._stopping

    @property
    def worker_pid(self) -> int | None:
        inc = self._inc
        return inc.pid if inc is not None else None

    @property
    def model_name(self) -> str | None:
        return self.last_ready.model_name if self.last_ready is not None else None

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
        """Stop the dispatcher and the worker (asks politely, then terminates, then kills)."""
        self._stopping = True
        self.draining = True
        if self._respawn_handle is not None:
            self._respawn_handle.cancel()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        self._fail_all(UnavailableError("the server is shutting down", code="shutting_down"))
        inc, self._inc = self._inc, None
        self.state = WorkerState.STOPPED
        self.metrics.worker_ready.set(0)
        if inc is not None:
            await asyncio.to_thread(inc.shutdown)

    # ------------------------------------------------------------------ request path
    def check_accepting(self) -> None:
        """Refuse early (503) while draining or while no warm worker exists."""
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.draining or self._stopping:
            self.metrics.rejections.labels(reason="shutting_down").inc()
            raise UnavailableError("the server is shutting down", code="shutting_down", headers=retry)
        if self.state is not WorkerState.READY:
            self.metrics.rejections.labels(reason="worker_not_ready").inc()
            raise UnavailableError(
                f"the model worker is {self.state.value}; retry shortly",
                code="worker_not_ready",
                headers=retry,
            )

    async def estimate(self, image_size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """(estimated visual tokens, model input size) of an image of `image_size`, cached per size."""
        cached = self._estimates.get(image_size)
        if cached is not None:
            self._estimates.move_to_end(image_size)
            return cached
        inc = self._inc
        if inc is None or inc.ready is None:
            self.check_accepting()
            raise UnavailableError("the model worker is not ready", code="worker_not_ready")
        try:
            reply = await self._query(inc, lambda qid: EstimateQuery(qid, image_size))
        except TimeoutError:
            logger.warning("estimate for %s timed out; admitting with the fallback estimate", image_size)
            return inc.ready.fallback_visual_tokens, image_size
        assert isinstance(reply, EstimateReply)
        if reply.error is not None:
            raise ValidationFailedError(
                f"the model cannot take this image: {reply.error}", code="unsupported_image"
            )
        value = (reply.visual_tokens, reply.model_input_size)
        self._estimates[image_size] = value
        if len(self._estimates) > _ESTIMATE_CACHE_SIZE:
            self._estimates.popitem(last=False)
        return value

    async def ping(self) -> tuple[bool, str]:
        """Ask the worker to compute on its device; (ok, detail)."""
        inc = self._inc
        if inc is None or inc.ready is None:
            return False, f"worker {self.state.value}"
        try:
            reply = await self._query(inc, lambda qid: PingQuery(qid))
        except TimeoutError:
            return False, f"worker did not answer a ping within {QUERY_TIMEOUT_S:.0f} s"
        except UnavailableError as exc:
            return False, exc.message
        assert isinstance(reply, PingReply)
        return reply.ok, reply.detail

    def admit(self, visual_tokens: int) -> Ticket:
        """Take a queue ticket or raise 429 (counted by reason) / 503 when draining."""
        self.check_accepting()
        try:
            return self.admission.try_admit(visual_tokens)
        except QueueFullError as exc:
            self.metrics.rejections.labels(reason=exc.code).inc()
            raise

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a request as in progress (drain waits for these)."""
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

    def submit(self, item: WorkItem, ticket: Ticket) -> Submission:
        """Queue an admitted, decoded request for the next batch."""
        assert self._loop is not None
        if self.draining or self._stopping or self.state is not WorkerState.READY:
            self.admission.release(ticket)
            self.check_accepting()
        submission = Submission(item=item, ticket=ticket, future=self._loop.create_future())
        pending = PendingItem(payload=submission, enqueued_at=time.monotonic(), deadline=item.deadline)
        submission.pending = pending
        submission.enqueued_at = pending.enqueued_at
        self.queue.put(pending)
        return submission

    def withdraw(self, submission: Submission) -> None:
        """The client left or its deadline passed: drop it from the queue (a running one just loses its answer)."""
        if submission.pending is not None:
            self.queue.remove(submission.pending)
        self.admission.release(submission.ticket)
        if not submission.future.done():
            submission.future.cancel()

    # ------------------------------------------------------------------ dispatcher
    async def _dispatch_loop(self) -> None:
        while not self._stopping:
            await self._ready_event.wait()
            pending = await collect_batch(self.queue, self.settings.max_batch_size, self.settings.max_wait_s)
            try:
                await self._dispatch(pending)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not leave every later request hanging until its deadline
                logger.exception("dispatching a batch of %d failed", len(pending))
                for entry in pending:
                    self._resolve(entry.payload, NuwaError("internal error while dispatching the batch"))

    async def _dispatch(self, pending: list[PendingItem[Submission]]) -> None:
        """Send one collected batch to the worker (dropping expired items) and route the answers."""
        inc = self._inc
        if inc is None or self.state is not WorkerState.READY:
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
            submission.pending = None
            submission.dispatched_at = now
            self.admission.release(submission.ticket)
            submissions.append(submission)
        await self._run_batch(inc, submissions)

    async def _run_batch(self, inc: WorkerProcess, submissions: list[Submission]) -> None:
        assert self._loop is not None
        batch_id = next(self._batch_ids)
        flight = _InFlight(submissions, self._loop.create_future(), inc.number)
        self._inflight[batch_id] = flight
        self.metrics.batch_size.observe(len(submissions))
        self.metrics.requests_running.set(len(submissions))
        try:
            message = RunBatch(batch_id, tuple(s.item for s in submissions))
            try:
                await asyncio.to_thread(inc.send_batch, message)
            except (OSError, ValueError) as exc:  # the worker died under us; its exit handler fails the batch
                logger.warning("sending batch %d failed: %s", batch_id, exc)
            done = await flight.done
        finally:
            self._inflight.pop(batch_id, None)
            self.metrics.requests_running.set(0)
        if done is None:
            return
        by_id = {s.item.request_id: s for s in submissions}
        for outcome in done.outcomes:
            submission = by_id.pop(outcome.request_id, None)
            if submission is None:
                continue
            if isinstance(outcome, WorkerFailure):
                self._resolve(submission, _error_of(outcome, self.settings.retry_after_s))
            else:
                self._resolve(submission, outcome)
        for submission in by_id.values():  # the worker forgot one: never leave a client hanging
            self._resolve(submission, NuwaError("the worker returned no answer for this request"))

    def _resolve(self, submission: Submission, outcome: ItemResult | NuwaError) -> None:
        self.admission.release(submission.ticket)
        future = submission.future
        if future.done():
            return
        if isinstance(outcome, NuwaError):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def _fail_all(self, error: NuwaError) -> None:
        """Answer every queued and in-flight request with `error` (worker death, shutdown)."""
        for entry in self.queue.take_all():
            entry.payload.pending = None
            self._resolve(entry.payload, error)
        for flight in list(self._inflight.values()):
            for submission in flight.submissions:
                self._resolve(submission, error)
            if not flight.done.done():
                flight.done.set_result(None)
        for future in self._queries.values():
            if not future.done():
                future.set_exception(UnavailableError("the model worker is gone", code="worker_died"))
        self._queries.clear()

    async def _query(self, inc: WorkerProcess, build: Any) -> Any:
        assert self._loop is not None
        query_id = next(self._query_ids)
        future = self._loop.create_future()
        self._queries[query_id] = future
        try:
            inc.send_control(build(query_id))
        except (OSError, ValueError) as exc:
            self._queries.pop(query_id, None)
            raise UnavailableError("the model worker is not reachable", code="worker_died") from exc
        try:
            return await asyncio.wait_for(future, QUERY_TIMEOUT_S)
        finally:
            self._queries.pop(query_id, None)

    # ------------------------------------------------------------------ worker processes
    def _spawn(self) -> None:
        self._respawn_handle = None
        if self._stopping:
            return
        inc = WorkerProcess(next(self._numbers), self.settings, self._ctx, self._deliver)
        self._inc = inc
        logger.info("worker %d started (pid %s), loading %s", inc.number, inc.pid, self.settings.model)
        assert self._loop is not None
        self._loop.call_later(self.settings.worker_start_timeout_s, self._check_started, inc)

    def _deliver(self, inc: WorkerProcess, message: object) -> None:
        """Reader-thread callback: hop onto the event loop (None = the worker is gone)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self._on_message, inc, message)

    def _on_message(self, inc: WorkerProcess, message: object) -> None:
        if inc is not self._inc:
            return  # a message from a previous incarnation
        if message is None:
            self._on_exit(inc)
        elif isinstance(message, WorkerReady):
            inc.ready = message
            self.last_ready = message
            self.state = WorkerState.READY
            self.last_error = None
            self._start_failures = 0
            self._ready_event.set()
            self.metrics.worker_ready.set(1)
            logger.info("worker %d ready: %s on %s", inc.number, message.model_name, message.device)
        elif isinstance(message, WorkerStartFailed):
            self.last_error = message.message
            logger.error("worker %d failed to start: %s", inc.number, message.message)
        elif isinstance(message, BatchDone):
            flight = self._inflight.get(message.batch_id)
            if flight is not None and not flight.done.done():
                flight.done.set_result(message)
        elif isinstance(message, EstimateReply | PingReply):
            future = self._queries.pop(message.query_id, None)
            if future is not None and not future.done():
                future.set_result(message)

    def _on_exit(self, inc: WorkerProcess) -> None:
        self._inc = None
        self._ready_event.clear()
        self.metrics.worker_ready.set(0)
        self._estimates.clear()
        inc.close()
        inc.kill()  # pipes closed but maybe still running: make the exit real
        if self._stopping:
            self.state = WorkerState.STOPPED
            return
        self.state = WorkerState.RESTARTING
        code = inc.exitcode
        was_ready = inc.ready is not None
        logger.error("worker %d (pid %s) exited with code %s; restarting", inc.number, inc.pid, code)
        self._fail_all(
            UnavailableError(
                f"the model worker died (exit code {code}); retry shortly",
                code="worker_died",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        )
        self.restarts += 1
        self.metrics.worker_restarts.inc()
        if was_ready:
            delay = 0.1
        else:
            self._start_failures += 1
            delay = min(30.0, 0.5 * 2 ** (self._start_failures - 1))
        assert self._loop is not None
        self._respawn_handle = self._loop.call_later(delay, self._spawn)

    def _check_started(self, inc: WorkerProcess) -> None:
        if inc is self._inc and inc.ready is None and inc.is_alive():
            self.last_error = f"worker start exceeded {self.settings.worker_start_timeout_s:.0f} s"
            logger.error("%s; killing it", self.last_error)
            inc.kill()


def _error_of(failure: WorkerFailure, retry_after_s: int) -> NuwaError:
    """The typed error of a worker's failure record (status and code travel as data)."""
    error = NuwaError(failure.message, code=failure.code)
    error.status_code = failure.status
    if failure.status in (429, 503):
        error.headers = {"Retry-After": str(retry_after_s)}
    return error


__all__ = ["QUERY_TIMEOUT_S", "Submission", "Supervisor", "WorkerState"]

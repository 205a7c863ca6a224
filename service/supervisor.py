"""API-side owner of the worker PROCESS: spawn, readiness, liveness pings, restarts, give-up, shutdown.

The queue, admission and batches belong to `service.scheduler.Scheduler`; this module only keeps a worker alive
and tells its listener (the scheduler) what happens to it:

* Spawned with multiprocessing "spawn" (`service.worker_process.WorkerProcess`); readiness comes with the
  worker's `WorkerReady`, after a real warm-up forward.
* A worker that dies is noticed at once (the event loop watches its process sentinel): the listener fails
  every request it held with 503, readiness drops, and a new worker is spawned (at once after a crash, with
  backoff when it dies during start-up).
* A model that cannot load or warm up must not crash-loop in silence: after `worker_start_attempts`
  consecutive failed starts the supervisor stops retrying, keeps the cause on /healthz and /readyz, logs ONE
  line saying what to fix, and asks the server to exit non-zero after `worker_failure_exit_s`, so an
  orchestrator shows a failed pod instead of an endless "restarting".
* Liveness pings go to the worker's control thread, which answers without waiting for model work.

Everything here runs on the event loop, the worker's messages included (`WorkerProcess` reads its pipes there).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import multiprocessing as mp
from collections.abc import Callable
from typing import Protocol

from service.errors import NuwaError, UnavailableError
from service.messages import (
    BatchDone,
    BatchStarted,
    PingQuery,
    PingReply,
    TextDelta,
    WorkerReady,
    WorkerStartFailed,
)
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.worker_process import WorkerProcess

logger = logging.getLogger(__name__)


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


class WorkerListener(Protocol):
    """What the supervisor tells the scheduler (all calls on the event loop)."""

    def on_worker_ready(self, ready: WorkerReady) -> None: ...

    def on_batch_started(self, message: BatchStarted) -> None: ...

    def on_batch_done(self, message: BatchDone) -> None: ...

    def on_text(self, message: TextDelta) -> None: ...

    def on_worker_lost(self, error: NuwaError) -> None: ...


class Supervisor:
    """Keeps one worker process alive (see the module docstring).

    Args:
        settings: Service settings (also pickled into the worker).
        metrics: Where worker restarts and readiness are recorded.
        on_fatal: Called once with a message when the worker cannot be started (the server then exits).
    """

    def __init__(
        self, settings: Settings, metrics: ServiceMetrics, on_fatal: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.listener: WorkerListener | None = None
        self.state = WorkerState.STARTING
        self.restarts = 0
        self.last_error: str | None = None
        self.last_ready: WorkerReady | None = None
        self.ready_event = asyncio.Event()
        self._on_fatal = on_fatal
        self._stopping = False
        self._ctx = mp.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current: WorkerProcess | None = None
        self._numbers = itertools.count(1)
        self._ping_ids = itertools.count(1)
        self._pings: dict[int, asyncio.Future[PingReply]] = {}
        self._start_failures = 0
        self._respawn_handle: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Spawn the worker; returns at once (readiness comes later, see `ready_event`)."""
        self._loop = asyncio.get_running_loop()
        self.metrics.worker_ready.set(0)
        self._spawn()

    async def stop(self) -> None:
        """Stop the worker (asks politely through its batch pipe, then terminates, then kills)."""
        self._stopping = True
        if self._respawn_handle is not None:
            self._respawn_handle.cancel()
        worker, self._current = self._current, None
        self.state = WorkerState.STOPPED
        self.ready_event.clear()
        self.metrics.worker_ready.set(0)
        if worker is not None:
            await asyncio.to_thread(worker.shutdown)

    @property
    def worker(self) -> WorkerProcess | None:
        """The current worker when it is ready to take batches, else None."""
        worker = self._current
        if worker is None or worker.ready is None or self.state is not WorkerState.READY or self._stopping:
            return None
        return worker

    @property
    def worker_pid(self) -> int | None:
        worker = self._current
        return worker.pid if worker is not None else None

    @property
    def model_name(self) -> str | None:
        return self.last_ready.model_name if self.last_ready is not None else None

    def kill(self, reason: str) -> None:
        """Kill the current worker (stuck batch); its exit is handled like any death, then it is replaced.

        A worker that had been ready is being restarted, not failing to start: /healthz says "starting" from this
        moment, as it does once the exit is seen, so `last_error` stays clear (a stuck batch is in the log, in the
        503 its requests got and in `nuwa_rejections_total{reason="worker_stuck"}`). Setting it made /healthz a
        503 `worker_down` for the few milliseconds until the exit was noticed, which a probe could land in.
        """
        worker = self._current
        if worker is not None:
            logger.error("killing worker %d (pid %s): %s", worker.number, worker.pid, reason)
            if worker.ready is None:
                self.last_error = reason
            # Not ready from this moment: its exit is noticed a little later, and nothing may go to it meanwhile.
            self.state = WorkerState.RESTARTING
            self.ready_event.clear()
            self.metrics.worker_ready.set(0)
            worker.kill()

    async def ping(self) -> PingReply:
        """Ask the worker's control thread for its state; raises when it does not answer in time.

        Raises:
            UnavailableError: No live worker, or no answer within `liveness_timeout_s`.
        """
        worker = self._current
        if worker is None or worker.ready is None:
            raise UnavailableError(f"worker {self.state.value}", code="worker_not_ready")
        assert self._loop is not None
        ping_id = next(self._ping_ids)
        future: asyncio.Future[PingReply] = self._loop.create_future()
        self._pings[ping_id] = future
        try:
            worker.send_control(PingQuery(ping_id))
            return await asyncio.wait_for(future, self.settings.liveness_timeout_s)
        except (OSError, ValueError) as exc:
            raise UnavailableError("the model worker is not reachable", code="worker_died") from exc
        except TimeoutError:
            raise UnavailableError(
                f"the worker did not answer a ping within {self.settings.liveness_timeout_s:g} s",
                code="worker_unresponsive",
            ) from None
        finally:
            self._pings.pop(ping_id, None)

    # ------------------------------------------------------------------ worker processes
    def _spawn(self) -> None:
        self._respawn_handle = None
        if self._stopping:
            return
        assert self._loop is not None
        worker = WorkerProcess(next(self._numbers), self.settings, self._ctx, self._on_message, self._loop)
        self._current = worker
        logger.info("worker %d started (pid %s), loading %s", worker.number, worker.pid, self.settings.model)
        self._loop.call_later(self.settings.worker_start_timeout_s, self._check_started, worker)

    def _on_message(self, worker: WorkerProcess, message: object) -> None:
        if worker is not self._current:
            return  # a message from a previous incarnation
        listener = self.listener
        if message is None:
            self._on_exit(worker)
        elif isinstance(message, BatchDone):
            if listener is not None:
                listener.on_batch_done(message)
        elif isinstance(message, TextDelta):
            if listener is not None:
                listener.on_text(message)
        elif isinstance(message, BatchStarted):
            if listener is not None:
                listener.on_batch_started(message)
        elif isinstance(message, PingReply):
            future = self._pings.pop(message.query_id, None)
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, WorkerReady):
            self._on_ready(worker, message)
        elif isinstance(message, WorkerStartFailed):
            self.last_error = message.message + (f" -- fix: {message.hint}" if message.hint else "")
            logger.error("worker %d failed to start: %s", worker.number, self.last_error)

    def _on_ready(self, worker: WorkerProcess, message: WorkerReady) -> None:
        worker.ready = message
        self.last_ready = message
        self.state = WorkerState.READY
        self.last_error = None
        self._start_failures = 0
        if self.listener is not None:
            self.listener.on_worker_ready(message)
        self.ready_event.set()
        self.metrics.worker_ready.set(1)
        logger.info("worker %d ready: %s on %s", worker.number, message.model_name, message.device)

    def _on_exit(self, worker: WorkerProcess) -> None:
        self._current = None
        self.ready_event.clear()
        self.metrics.worker_ready.set(0)
        worker.close()
        worker.kill()  # pipes closed but maybe still running: make the exit real
        for future in self._pings.values():
            if not future.done():
                future.set_exception(UnavailableError("the model worker is gone", code="worker_died"))
        if self._stopping:
            self.state = WorkerState.STOPPED
            return
        code = worker.exitcode
        was_ready = worker.ready is not None
        logger.error("worker %d (pid %s) exited with code %s", worker.number, worker.pid, code)
        if self.listener is not None:
            self.listener.on_worker_lost(
                UnavailableError(
                    f"the model worker died (exit code {code}); retry shortly",
                    code="worker_died",
                    headers={"Retry-After": str(self.settings.retry_after_s)},
                )
            )
        self.restarts += 1
        self.metrics.worker_restarts.inc()
        if was_ready:  # a crash or a kill of a worker that had started: not a start failure
            delay = 0.1
            self.last_error = None
        else:
            self._start_failures += 1
            if self._start_failures >= self.settings.worker_start_attempts:
                self._give_up()
                return
            delay = min(30.0, 0.5 * 2 ** (self._start_failures - 1))
        self.state = WorkerState.RESTARTING
        assert self._loop is not None
        self._respawn_handle = self._loop.call_later(delay, self._spawn)

    def _give_up(self) -> None:
        self.state = WorkerState.FAILED
        cause = self.last_error or "the worker exited before it was ready"
        exit_s = self.settings.worker_failure_exit_s
        logger.critical(
            "the model worker failed to start %d times in a row; giving up. Cause: %s. %s",
            self._start_failures,
            cause,
            f"The server exits with code 3 in {exit_s:g} s."
            if exit_s > 0
            else "The server stays up, unready.",
        )
        if exit_s > 0 and self._on_fatal is not None:
            assert self._loop is not None
            self._loop.call_later(exit_s, self._on_fatal, cause)

    def _check_started(self, worker: WorkerProcess) -> None:
        if worker is self._current and worker.ready is None and worker.is_alive():
            self.last_error = f"worker start exceeded {self.settings.worker_start_timeout_s:.0f} s"
            logger.error("%s; killing it", self.last_error)
            worker.kill()


__all__ = ["Supervisor", "WorkerListener", "WorkerState"]

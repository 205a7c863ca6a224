"""One incarnation of the worker: the spawned process, its two pipes, and the event-loop readers on them.

Kept apart from the supervisor's queueing logic because its job is purely mechanical: start the process with
multiprocessing "spawn" (CUDA-safe; the parent never imports torch), hand it fresh pipes (a process killed
mid-write can leave a pipe unusable, so nothing is reused across restarts), and forward everything the worker
sends. The event loop watches both pipes AND the process sentinel (`loop.add_reader`, each pipe read by an
`Inbox`), so a worker that dies, even by SIGKILL, is reported at once rather than at the next poll, and an answer
reaches its request without a thread hand-off. Each pipe has exactly one writer on this side: the batch pipe an
`Outbox` (batches, cancels and the final `Shutdown` go through it in order, a big batch is pickled off the event
loop, and two messages never interleave), the control pipe a lock-guarded send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext

from service.inbox import Inbox
from service.messages import Shutdown, WorkerReady
from service.outbox import Outbox, frame, write_all
from service.settings import Settings
from service.worker import run_worker

logger = logging.getLogger(__name__)

OnMessage = Callable[["WorkerProcess", object], None]
"""Called on the event loop with each message, then once with None when the worker is gone."""


class WorkerProcess:
    """A spawned worker and its pipes.

    Args:
        number: Incarnation number (1 for the first worker, +1 per restart), for logs.
        settings: Pickled into the child.
        context: A multiprocessing "spawn" context.
        on_message: Receives every message, on `loop`.
        loop: The running event loop (this object must be created on it).
    """

    def __init__(
        self,
        number: int,
        settings: Settings,
        context: SpawnContext,
        on_message: OnMessage,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.number = number
        self.ready: WorkerReady | None = None
        self.started_at = time.monotonic()
        self._on_message = on_message
        self._batch_conn, batch_child = context.Pipe(duplex=True)
        self._ctrl_conn, ctrl_child = context.Pipe(duplex=True)
        self.process = context.Process(
            target=run_worker,
            args=(settings, batch_child, ctrl_child),
            name=f"nuwa-worker-{number}",
            daemon=True,
        )
        self.process.start()
        batch_child.close()  # only the child may hold its ends, or EOF never arrives when it dies
        ctrl_child.close()
        self._outbox = Outbox(self._batch_conn, f"nuwa-send-{number}")
        self._ctrl_lock = threading.Lock()
        self._loop = loop
        self._inboxes = {conn: Inbox(conn) for conn in (self._batch_conn, self._ctrl_conn)}
        self._finished = False
        self._closed = False
        for conn in self._inboxes:
            loop.add_reader(conn.fileno(), self._readable, conn)
        loop.add_reader(self.process.sentinel, self._exited)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def send(self, message: object) -> None:
        """Hand a message to the batch pipe's outbox (`RunBatch`, `Cancel`); returns at once, order is kept."""
        self._outbox.send(message)

    def send_control(self, message: object) -> None:
        """Send a small control query (answered by the worker's control thread, even mid-batch)."""
        # Not Connection.send: the loop watches this pipe, so uvloop has made its descriptor non-blocking.
        with self._ctrl_lock:
            write_all(self._ctrl_conn, frame(message))

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    def close(self) -> None:
        """Stop watching and close both pipes (on the event loop; from another thread it is handed over)."""
        if not self._on_loop_thread():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing watches the pipes any more
                self._loop.call_soon_threadsafe(self.close)
                return
        if self._closed:
            return
        self._closed = True
        self._stop_watching()
        for conn in (self._batch_conn, self._ctrl_conn):
            with contextlib.suppress(OSError):
                conn.close()

    def shutdown(self, join_s: float = 10.0) -> None:
        """Ask the worker to exit, then escalate: SIGTERM after `join_s`, SIGKILL 3 s later (blocking).

        `Shutdown` goes through the outbox behind anything still queued, so it never cuts a frame in half.
        """
        self._outbox.send(Shutdown())
        self._outbox.close(timeout_s=join_s)
        self.process.join(join_s)
        if self.process.is_alive():
            logger.warning("worker %d did not exit; terminating", self.number)
            self.process.terminate()
            self.process.join(3.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(3.0)
        self.close()

    # ------------------------------------------------------------------ event-loop readers
    def _readable(self, conn: Connection) -> None:
        """Loop callback: deliver what has arrived on `conn`; at EOF of both pipes the worker is gone."""
        inbox = self._inboxes.get(conn)
        if inbox is None:
            return
        try:
            messages, closed = inbox.read()
        except Exception:  # an unreadable frame: the stream cannot be trusted any more
            logger.exception("worker %d sent a message that could not be read", self.number)
            messages, closed = [], True
        for message in messages:
            self._on_message(self, message)
        if closed:
            self._unwatch(conn)
            if not self._inboxes:
                self._finish()

    def _exited(self) -> None:
        """Loop callback on the process sentinel: deliver what the worker managed to send, then report None."""
        for conn, inbox in list(self._inboxes.items()):
            try:
                messages, _ = inbox.read(max_reads=None)
                for message in messages:
                    self._on_message(self, message)
            except Exception:  # logged; the death is still reported, so every request it held gets its 503
                logger.exception("worker %d: its last messages could not be delivered", self.number)
            self._unwatch(conn)
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._stop_watching()
        self._on_message(self, None)

    def _unwatch(self, conn: Connection) -> None:
        if self._inboxes.pop(conn, None) is not None:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                self._loop.remove_reader(conn.fileno())

    def _stop_watching(self) -> None:
        for conn in list(self._inboxes):
            self._unwatch(conn)
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            self._loop.remove_reader(self.process.sentinel)

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False


__all__ = ["OnMessage", "WorkerProcess"]

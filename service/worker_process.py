"""One incarnation of the worker: the spawned process, its two pipes, and the thread that reads them.

Kept apart from the supervisor's queueing logic because its job is purely mechanical: start the process with
multiprocessing "spawn" (CUDA-safe; the parent never imports torch), hand it fresh pipes (a process killed
mid-write can leave a pipe unusable, so nothing is reused across restarts), and forward everything the worker
sends. The reader thread waits on both pipes AND the process sentinel, so a worker that dies, even by SIGKILL,
is reported at once rather than at the next poll. Each pipe has exactly one writer on this side: the batch pipe an
`Outbox` thread (batches, cancels and the final `Shutdown` go through it in order, so pickling a big batch never
blocks the event loop and two messages never interleave), the control pipe a lock-guarded send.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext

from service.messages import Shutdown, WorkerReady
from service.outbox import Outbox
from service.settings import Settings
from service.worker import run_worker

logger = logging.getLogger(__name__)

OnMessage = Callable[["WorkerProcess", object], None]
"""Called from the reader thread with each message, then once with None when the worker is gone."""


class WorkerProcess:
    """A spawned worker and its pipes.

    Args:
        number: Incarnation number (1 for the first worker, +1 per restart), for logs.
        settings: Pickled into the child.
        context: A multiprocessing "spawn" context.
        on_message: Receives every message (from the reader thread; hop to the event loop yourself).
    """

    def __init__(self, number: int, settings: Settings, context: SpawnContext, on_message: OnMessage) -> None:
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
        threading.Thread(target=self._read, name=f"nuwa-pump-{number}", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def send(self, message: object) -> None:
        """Enqueue a message for the batch pipe (`RunBatch`, `Cancel`); returns at once, order is kept."""
        self._outbox.send(message)

    def send_control(self, message: object) -> None:
        """Send a small control query (answered by the worker's control thread, even mid-batch)."""
        with self._ctrl_lock:
            self._ctrl_conn.send(message)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    def close(self) -> None:
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

    def _read(self) -> None:
        """Thread: forward messages; on the sentinel read what the worker managed to send, then report None."""
        conns: list[Connection] = [self._batch_conn, self._ctrl_conn]
        sentinel = self.process.sentinel
        while conns:
            try:
                ready = wait([*conns, sentinel])
            except OSError:  # closed under us (shutdown)
                break
            for conn in list(conns):
                if conn not in ready:
                    continue
                try:
                    self._on_message(self, conn.recv())
                except (EOFError, OSError):
                    conns.remove(conn)
            if sentinel in ready:
                for conn in conns:
                    with contextlib.suppress(EOFError, OSError):
                        while conn.poll(0):
                            self._on_message(self, conn.recv())
                break
        self._on_message(self, None)


__all__ = ["OnMessage", "WorkerProcess"]

"""The one writer of a pipe end: every message to the other process goes through one thread, in order.

Why: `Connection.send` from two threads at once can interleave two pickled frames and corrupt the stream (the old
shutdown sent `Shutdown` from one thread while a batch was still being written from another). With an outbox,
callers only enqueue; the writer thread sends one whole message after another, and `close` flushes what was
enqueued before it. Used on both sides: the API's batch pipe and the worker's batch pipe.
"""

from __future__ import annotations

import logging
import queue
import threading
from multiprocessing.connection import Connection

logger = logging.getLogger(__name__)

_CLOSE = object()


class Outbox:
    """A writer thread that owns `conn`'s sending side.

    Args:
        conn: The pipe end (nothing else may call its `send`).
        name: Thread name, for logs.
    """

    def __init__(self, conn: Connection, name: str) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._broken: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name=name, daemon=True)
        self._thread.start()

    @property
    def broken(self) -> BaseException | None:
        """The error that stopped the writer (the peer went away), or None while it works."""
        return self._broken

    def send(self, message: object) -> None:
        """Enqueue `message` (returns at once; a broken pipe is logged, and later messages are dropped)."""
        self._queue.put(message)

    def close(self, timeout_s: float = 5.0) -> bool:
        """Send what was enqueued, then stop; True when everything was written within `timeout_s`."""
        self._queue.put(_CLOSE)
        self._thread.join(timeout_s)
        return not self._thread.is_alive() and self._broken is None

    def _write(self) -> None:
        while True:
            message = self._queue.get()
            if message is _CLOSE:
                return
            if self._broken is not None:
                continue
            try:
                self._conn.send(message)
            except (OSError, ValueError, EOFError) as exc:  # the peer is gone: say so once, keep draining
                self._broken = exc
                logger.warning("pipe closed while sending %s: %s", type(message).__name__, exc)


__all__ = ["Outbox"]

"""The one writer of a pipe end: every message to the other process leaves in order, whole, and never blocks.

Why a writer thread at all: `Connection.send` from two threads at once can interleave two pickled frames and
corrupt the stream (the old shutdown sent `Shutdown` from one thread while a batch was still being written from
another), and a blocking write of a big batch into a full pipe must never stall the event loop. So callers only
hand messages over; the writer thread sends one whole message after another, and `close` flushes what was handed
over before it. Used on both sides: the API's batch pipe and the worker's batch pipe.

Why not ALWAYS the thread: waking it costs a thread hand-off (0.2-0.3 ms on a busy 2-core machine, and the
GIL passed back and forth), on every batch and on every answer. So a small message (`inline_max_bytes`, judged
by `wire_size_hint` before anything is pickled) that finds the writer idle is written by the caller itself, with
one non-blocking `send`. Whatever part of the frame the socket does not take at once goes to the writer thread,
and everything after it queues behind it, so order and frame boundaries hold either way and the caller never
waits on the other process. The frames are the ones `Connection.send` writes (`Connection.recv` reads them);
the thread writes them with `write_all`, which also copes with a descriptor that the event loop has made
non-blocking.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import struct
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

logger = logging.getLogger(__name__)

INLINE_MAX_BYTES = 256 * 1024
"""Messages whose `wire_size_hint` is at most this are written by the caller when the writer is idle."""

_CLOSE = object()
_LARGE_FRAME = 0x7FFFFFFF  # Connection's own threshold for its 8-byte length header


def wire_size_hint(message: object) -> int:
    """Bytes a message carries beyond its fixed fields (the images of a batch); 0 for small control messages.

    Judged without pickling, so that a big batch is pickled by the writer thread, never by the event loop.
    """
    hint = getattr(message, "wire_size_hint", None)
    return int(hint()) if callable(hint) else 0


def frame_parts(message: object) -> tuple[bytes, bytes | memoryview]:
    """`message` as `Connection.send` frames it: the length header, and the pickle (not copied again)."""
    payload = ForkingPickler.dumps(message)
    size = len(payload)
    header = (
        struct.pack("!i", -1) + struct.pack("!Q", size) if size > _LARGE_FRAME else struct.pack("!i", size)
    )
    return header, payload


def frame(message: object) -> bytes:
    """`message` as the bytes `Connection.send` would write: length header + pickle, in one piece."""
    header, payload = frame_parts(message)
    return header + bytes(payload)


def write_all(conn: Connection, *chunks: bytes | memoryview) -> None:
    """Write every chunk to `conn`'s descriptor, waiting for room whenever the pipe is full (blocking caller).

    Unlike `Connection.send`, this also works when the descriptor is in non-blocking mode, which it is on the
    API side: uvloop (libuv) switches every descriptor it watches to non-blocking, and the event loop watches
    this pipe for the worker's answers (`service.inbox`). There a full pipe makes `os.write` raise
    `BlockingIOError` instead of waiting, which `Connection.send` would take for a broken pipe.

    Raises:
        OSError: The other end is gone (`BrokenPipeError`, `ConnectionResetError`) or `conn` is closed.
    """
    fd = conn.fileno()
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view:
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                _wait_writable(fd)
                continue
            except InterruptedError:
                continue
            view = view[written:]


def _wait_writable(fd: int) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.poll()  # no timeout: an end that goes away reports POLLERR/POLLHUP, and the next write raises


class Outbox:
    """The owner of `conn`'s sending side (see the module docstring).

    Args:
        conn: The pipe end (nothing else may write to it).
        name: Thread name, for logs.
        inline_max_bytes: The largest `wire_size_hint` the caller writes itself; a negative value sends
            everything through the thread. Inline writes need `conn` to be a socket (multiprocessing's duplex pipes on POSIX are);
            other pipes always use the thread.
    """

    def __init__(self, conn: Connection, name: str, inline_max_bytes: int = INLINE_MAX_BYTES) -> None:
        self._conn = conn
        self._inline_max = inline_max_bytes if _is_unix_socket(conn) else -1
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # handed to the thread and not yet written (guarded by _lock)
        self._broken: BaseException | None = None
        self.inline_sends = 0
        """How many messages were written whole by their caller (for tests and profiling)."""
        self._thread = threading.Thread(target=self._write, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Messages handed to the writer thread and not yet written; 0 means the next small one may go inline.

        The other end can hold a message before this drops: the thread counts it written only after `write_all`
        returns, so a test that reads the message and then expects an idle writer has to wait for 0 first.
        """
        with self._lock:
            return self._pending

    @property
    def broken(self) -> BaseException | None:
        """The error that stopped the writer (the peer went away), or None while it works."""
        return self._broken

    def send(self, message: object) -> None:
        """Write or enqueue `message`; returns at once. A broken pipe is logged once, later messages are dropped."""
        if self._broken is not None:
            return
        inline = wire_size_hint(message) <= self._inline_max
        with self._lock:  # one lock for both ways out, so messages leave in the order their senders got it
            if inline and self._pending == 0:
                self._send_inline(frame(message))
                return
            self._pending += 1
            self._queue.put(message)

    def close(self, timeout_s: float = 5.0) -> bool:
        """Send what was handed over, then stop; True when everything was written within `timeout_s`."""
        self._queue.put(_CLOSE)
        self._thread.join(timeout_s)
        return not self._thread.is_alive() and self._broken is None

    def _send_inline(self, data: bytes) -> None:
        """Under the lock, writer idle: one non-blocking send; the rest of the frame goes to the thread."""
        try:
            with borrowed_socket(self._conn) as sock:
                sent = sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(exc, "a message")
            return
        if sent == len(data):
            self.inline_sends += 1
            return
        self._pending += 1
        self._queue.put(_Remainder(memoryview(data)[sent:]))

    def _write(self) -> None:
        while True:
            message = self._queue.get()
            if message is _CLOSE:
                return
            try:
                if self._broken is None:
                    if isinstance(message, _Remainder):
                        write_all(self._conn, message.data)
                    else:
                        write_all(self._conn, *frame_parts(message))
            except (OSError, ValueError, EOFError) as exc:  # the peer is gone: say so once, keep draining
                self._fail(exc, type(message).__name__)
            finally:
                with self._lock:
                    self._pending -= 1

    def _fail(self, exc: BaseException, what: str) -> None:
        if self._broken is None:
            self._broken = exc
            logger.warning("pipe closed while sending %s: %s", what, exc)


class _Remainder:
    """The tail of a frame that an inline send could not write at once (raw bytes, no header of its own)."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = data


def _is_unix_socket(conn: Connection) -> bool:
    """Whether `conn` is a Unix socket (multiprocessing's duplex pipes on POSIX): only those take inline sends."""
    try:
        with borrowed_socket(conn) as sock:
            return sock.family == socket.AF_UNIX
    except OSError:  # not a socket (ENOTSOCK), or already closed
        return False


@contextlib.contextmanager
def borrowed_socket(conn: Connection) -> Iterator[socket.socket]:
    """A socket object on `conn`'s CURRENT descriptor, for one call, that never closes it (the Connection owns it).

    `conn.fileno()` raises once the Connection is closed, so a closed, perhaps reused, number is never used.
    """
    sock = socket.socket(fileno=conn.fileno())
    try:
        yield sock
    finally:
        sock.detach()


__all__ = [
    "INLINE_MAX_BYTES",
    "Outbox",
    "borrowed_socket",
    "frame",
    "frame_parts",
    "wire_size_hint",
    "write_all",
]

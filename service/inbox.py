"""The reading side of a pipe end, on the event loop: whole messages, no thread, never a blocking read.

Why not a reader thread: each answer would cross from that thread to the loop (`call_soon_threadsafe`, the loop
woken through its self-pipe, the GIL handed over), about 0.2-0.3 ms a message on a busy 2-core machine, and in a
py-spy profile of sequential requests the waking alone was a tenth of the event loop's busy samples. The loop
already waits on sockets; it can wait on the worker's pipe too (`loop.add_reader`) and read what has arrived.

An `Inbox` reads with non-blocking `recv` into a buffer and cuts it into the frames `Connection.send` writes
(4-byte length, or -1 and an 8-byte length, then the pickle), so a frame that arrives in pieces is simply
completed by a later read and nothing ever waits for the rest of it.
"""

from __future__ import annotations

import pickle
import socket
import struct
from multiprocessing.connection import Connection

from service.outbox import borrowed_socket

_CHUNK = 256 * 1024


class Inbox:
    """Whole messages from `conn` as they arrive (see the module docstring).

    Args:
        conn: A pipe end that is a Unix socket (multiprocessing's duplex pipes on POSIX).
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._buffer = bytearray()

    def read(self, max_reads: int | None = 16) -> tuple[list[object], bool]:
        """The messages complete so far, and whether the other end has closed (EOF, or the pipe is unusable).

        Args:
            max_reads: `recv` calls at most (None: until nothing is left). A bound keeps one busy pipe from
                holding the loop; the loop calls again while data is waiting.
        """
        closed = False
        reads = 0
        try:
            with borrowed_socket(self._conn) as sock:
                while max_reads is None or reads < max_reads:
                    reads += 1
                    try:
                        chunk = sock.recv(_CHUNK, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    except InterruptedError:
                        continue
                    if not chunk:
                        closed = True
                        break
                    self._buffer += chunk
                    if len(chunk) < _CHUNK and max_reads is not None:
                        break  # drained for now (the loop calls again on more data, or on EOF)
        except OSError:  # reset, or closed under us
            closed = True
        return self._frames(), closed

    def _frames(self) -> list[object]:
        messages: list[object] = []
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= 4:
            (size,) = struct.unpack_from("!i", buffer, start)
            header = 4
            if size == -1:
                if len(buffer) - start < 12:
                    break
                (size,) = struct.unpack_from("!Q", buffer, start + 4)
                header = 12
            end = start + header + size
            if len(buffer) < end:
                break
            messages.append(pickle.loads(buffer[start + header : end]))
            start = end
        if start:
            del buffer[:start]
        return messages


__all__ = ["Inbox"]

"""`Inbox`: whole messages from a pipe end without blocking, however the frames are cut; EOF is reported.

Real pipes: multiprocessing's duplex socketpair, written by `Connection.send` and by raw bytes cut anywhere.
"""

from __future__ import annotations

import multiprocessing as mp
import struct
import threading
import time
from multiprocessing.connection import Connection

from service.inbox import Inbox
from service.outbox import borrowed_socket, frame


def test_messages_arrive_whole_and_in_order() -> None:
    ours, theirs = mp.Pipe(duplex=True)
    inbox = Inbox(ours)
    assert inbox.read() == ([], False)  # nothing yet: returns at once, not closed
    sent = [("small", 1), {"big": b"x" * 1_000_000}, ("small", 2)]
    writer = threading.Thread(target=lambda: [theirs.send(message) for message in sent], daemon=True)
    writer.start()  # the big frame does not fit the socket buffer: it arrives over many reads
    got: list[object] = []
    reads = 0
    deadline = time.monotonic() + 20
    while len(got) < len(sent) and time.monotonic() < deadline:
        messages, closed = inbox.read(max_reads=1)
        assert not closed
        got += messages
        reads += 1
    writer.join(5)
    assert got == sent
    assert reads > 2


def test_a_frame_cut_anywhere_is_completed_by_a_later_read() -> None:
    first, second = ("first", b"y" * 5000), ("second",)
    data = frame(first) + frame(second)
    for cut in (1, 3, 4, 5, 100, len(frame(first)), len(data) - 1):
        ours, theirs = mp.Pipe(duplex=True)
        inbox = Inbox(ours)
        _write_raw(theirs, data[:cut])
        head, closed = inbox.read()
        assert not closed
        assert head == ([first] if cut >= len(frame(first)) else [])
        _write_raw(theirs, data[cut:])
        tail, _ = inbox.read()
        assert head + tail == [first, second], cut


def test_the_eight_byte_length_header_is_read() -> None:
    ours, theirs = mp.Pipe(duplex=True)
    inbox = Inbox(ours)
    payload = frame(("long header",))[4:]
    _write_raw(theirs, struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload)
    assert inbox.read() == ([("long header",)], False)


def test_eof_is_reported_after_the_last_messages() -> None:
    ours, theirs = mp.Pipe(duplex=True)
    inbox = Inbox(ours)
    theirs.send("last words")
    theirs.close()
    messages, closed = inbox.read(max_reads=None)
    assert messages == ["last words"]
    assert closed


def test_a_closed_connection_reads_as_closed() -> None:
    ours, theirs = mp.Pipe(duplex=True)
    inbox = Inbox(ours)
    ours.close()
    assert inbox.read() == ([], True)
    theirs.close()


def _write_raw(conn: Connection, data: bytes) -> None:
    with borrowed_socket(conn) as sock:
        sock.sendall(data)

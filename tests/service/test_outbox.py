"""`Outbox`: small messages are written by their caller when the writer is idle; order and frames hold always.

Real pipes (multiprocessing's duplex socketpair, and a one-way os pipe), real `Connection.recv` on the other end.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from multiprocessing.connection import Connection

import pytest

from models.budget import PruningConfig
from service.messages import ImageBlob, RunBatch, WorkItem
from service.outbox import INLINE_MAX_BYTES, Outbox, frame, frame_parts, wire_size_hint, write_all


def _receive(conn: Connection, count: int, timeout_s: float = 20.0) -> list[object]:
    got: list[object] = []

    def read() -> None:
        for _ in range(count):
            got.append(conn.recv())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    assert not reader.is_alive(), f"only {len(got)} of {count} messages arrived"
    return got


def _wait_until_idle(outbox: Outbox, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while outbox.pending and time.monotonic() < deadline:
        time.sleep(0.001)
    assert outbox.pending == 0, "the writer thread never finished its queue"


def _batch(image_bytes: int) -> RunBatch:
    item = WorkItem(
        request_id="r1",
        kind="ground",
        text="the red circle",
        config=PruningConfig(),
        max_new_tokens=8,
        image=ImageBlob(b"\x00" * image_bytes, "PNG", (8, 8)),
        deadline=time.monotonic() + 60,
    )
    return RunBatch(batch_id=1, items=(item,), sent_at=0.0)


def test_a_small_message_on_an_idle_writer_is_written_by_the_caller() -> None:
    ours, theirs = mp.Pipe(duplex=True)
    outbox = Outbox(ours, "test-send")
    outbox.send(("hello", 1))
    assert outbox.inline_sends == 1  # written before send() returned: no thread hand-off
    assert theirs.poll(0)  # already in the socket
    assert theirs.recv() == ("hello", 1)
    assert outbox.close()


def test_order_and_frames_hold_when_the_socket_fills_up() -> None:
    """Nobody reads at first: the socket buffer fills, a frame is cut in the middle, the rest goes via the thread."""
    ours, theirs = mp.Pipe(duplex=True)
    outbox = Outbox(ours, "test-send")
    messages: list[object] = [("small", i) for i in range(300)]
    messages += [("bulky", i, bytes([i]) * 150_000) for i in range(20)]  # no size hint: each tried inline
    messages.append(("huge", b"z" * 3_000_000))
    messages += [("after", i) for i in range(50)]
    for message in messages:
        outbox.send(message)
    assert 0 < outbox.inline_sends < len(messages)  # some written inline, the rest queued behind a cut frame
    assert _receive(theirs, len(messages)) == messages
    assert outbox.close()


def test_a_batch_with_large_images_is_pickled_by_the_thread() -> None:
    small, large = _batch(1_000), _batch(INLINE_MAX_BYTES + 1)
    assert wire_size_hint(small) == 1_000 and wire_size_hint(large) == INLINE_MAX_BYTES + 1
    assert wire_size_hint(("anything",)) == 0
    ours, theirs = mp.Pipe(duplex=True)
    outbox = Outbox(ours, "test-send")
    outbox.send(large)
    outbox.send(small)
    assert outbox.inline_sends == 0  # the small one queued behind the large one, never overtaking it
    got = _receive(theirs, 2)
    assert got == [large, small]
    _wait_until_idle(outbox)  # the reader can have both before the thread has counted the second one written
    outbox.send(small)
    assert outbox.inline_sends == 1
    assert _receive(theirs, 1) == [small]
    assert outbox.close()


def test_frames_are_what_connection_send_writes() -> None:
    ours, theirs = mp.Pipe(duplex=True)
    message = {"a": [1, 2, 3], "b": b"x" * 40_000}
    ours.send_bytes(frame(message)[4:])  # send_bytes adds its own header: the payload is the same pickle
    assert theirs.recv() == message
    assert int.from_bytes(frame(message)[:4], "big") == len(frame(message)) - 4


def test_a_one_way_pipe_uses_the_thread_only() -> None:
    theirs, ours = mp.Pipe(duplex=False)  # an os pipe, not a socket: no non-blocking send on it
    outbox = Outbox(ours, "test-send")
    outbox.send(("via", "thread"))
    assert _receive(theirs, 1) == [("via", "thread")]
    assert outbox.inline_sends == 0
    assert outbox.close()


@pytest.mark.parametrize("size", [10, 3_000_000])
def test_a_closed_peer_breaks_the_outbox_without_raising(size: int) -> None:
    ours, theirs = mp.Pipe(duplex=True)
    outbox = Outbox(ours, "test-send")
    theirs.close()
    for _ in range(3):
        outbox.send(("lost", b"y" * size))  # inline (small) or through the thread (large)
    deadline = time.monotonic() + 10
    while outbox.broken is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(outbox.broken, OSError)
    outbox.send(("dropped",))  # after the break: dropped, not raised
    assert not outbox.close()


def test_a_closed_connection_is_never_written_through_a_stale_descriptor() -> None:
    ours, theirs = mp.Pipe(duplex=True)
    outbox = Outbox(ours, "test-send")
    ours.close()
    outbox.send(("after close",))
    assert isinstance(outbox.broken, OSError)  # conn.fileno() refused: nothing was written anywhere
    theirs.close()


def test_the_thread_waits_for_room_on_a_non_blocking_descriptor() -> None:
    """uvloop makes every descriptor it watches non-blocking, and the API's event loop watches its batch pipe for
    answers: a big batch written into a full pipe must wait for room, not break the outbox (a regression: 16
    concurrent 40-megapixel uploads lost their batches this way)."""
    ours, theirs = mp.Pipe(duplex=True)
    os.set_blocking(ours.fileno(), False)
    outbox = Outbox(ours, "test-send")
    big = ("big", b"q" * 5_000_000)  # far more than the socket buffer: the writer meets EAGAIN many times
    outbox.send(big)
    outbox.send(("after",))
    time.sleep(0.2)  # let the writer fill the pipe while nobody reads
    assert outbox.broken is None
    assert _receive(theirs, 2) == [big, ("after",)]
    assert outbox.broken is None
    assert outbox.close()


def test_write_all_writes_whole_frames_to_a_non_blocking_descriptor() -> None:
    ours, theirs = mp.Pipe(duplex=True)
    os.set_blocking(ours.fileno(), False)
    message = ("whole", b"w" * 2_000_000)
    writer = threading.Thread(target=write_all, args=(ours, *frame_parts(message)), daemon=True)
    writer.start()
    assert _receive(theirs, 1) == [message]
    writer.join(5)
    assert not writer.is_alive()

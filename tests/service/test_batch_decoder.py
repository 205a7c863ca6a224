"""`BatchDecoder`: a batch's images decoded once each, several at a time, in item order, failures per item.

Real PNG/JPEG bytes and the real `decode_for_model`; only the overlap test wraps it, to see two decodes at once.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.budget import PruningConfig
from service import batch_decoder
from service.batch_decoder import BatchDecoder, cgroup_cpu_quota, default_decode_threads
from service.errors import UnsupportedMediaError
from service.images import decode_for_model
from service.messages import ImageBlob, WorkItem
from service.settings import Settings


def _encoded(seed: int, fmt: str, size: tuple[int, int] = (640, 480)) -> tuple[bytes, tuple[int, int]]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue(), size


def _item(request_id: str, data: bytes, size: tuple[int, int], fmt: str = "PNG") -> WorkItem:
    return WorkItem(
        request_id=request_id,
        kind="ground",
        text="the red circle",
        config=PruningConfig(),
        max_new_tokens=8,
        image=ImageBlob(data, fmt, size),
        deadline=time.monotonic() + 60,
    )


def _half(size: tuple[int, int]) -> tuple[int, int]:
    return size[0] // 2, size[1] // 2


def _decoder(threads: int) -> BatchDecoder:
    return BatchDecoder(_half, "bicubic", threads)


def _batch() -> list[WorkItem]:
    png, png_size = _encoded(1, "PNG")
    jpeg, jpeg_size = _encoded(2, "JPEG", (1600, 1200))
    other, other_size = _encoded(3, "PNG", (320, 200))
    return [
        _item("a", png, png_size),
        _item("b", jpeg, jpeg_size, "JPEG"),
        _item("c", png, png_size),  # the same image again (a second phrase)
        _item("d", other, other_size),
    ]


@pytest.mark.parametrize("threads", [1, 3])
def test_every_item_gets_its_own_image_in_order(threads: int) -> None:
    items = _batch()
    decoder = _decoder(threads)
    try:
        decoded = decoder.decode(items)
    finally:
        decoder.close()
    assert [d.error for d in decoded] == [None] * 4
    expected = [decode_for_model(i.image.data, _half(i.image.size), "bicubic").size for i in items]
    assert [d.image.size for d in decoded] == expected == [(640, 480), (800, 600), (640, 480), (320, 200)]
    assert decoded[0].image is decoded[2].image  # decoded once, shared
    assert decoded[0].digest == decoded[2].digest != decoded[1].digest
    reference = _decoder(1).decode(items)  # the pool gives the serial decoder's pixels
    for ours, theirs in zip(decoded, reference, strict=True):
        assert np.array_equal(np.asarray(ours.image), np.asarray(theirs.image))


def test_each_distinct_image_is_decoded_once_and_reused_by_the_next_batch(monkeypatch) -> None:
    calls: list[int] = []
    real = batch_decoder.decode_for_model

    def counting(data, size, resample):
        calls.append(len(data))
        return real(data, size, resample)

    monkeypatch.setattr(batch_decoder, "decode_for_model", counting)
    items = _batch()
    decoder = _decoder(2)
    first = decoder.decode(items)
    assert len(calls) == 3  # a, b, d: c reuses a
    assert first[2].seconds < first[0].seconds  # the reuse carries its hash only, the first item the decode
    second = decoder.decode(items)
    assert len(calls) == 3  # all four from the recent ones
    assert all(d.image is e.image for d, e in zip(first, second, strict=True))
    decoder.close()


def test_a_corrupt_image_fails_its_items_only() -> None:
    png, size = _encoded(4, "PNG")
    broken = png[: len(png) // 2]
    items = [_item("x", broken, size), _item("y", png, size), _item("z", broken, size)]
    decoder = _decoder(2)
    decoded = decoder.decode(items)
    decoder.close()
    assert isinstance(decoded[0].error, UnsupportedMediaError) and decoded[0].image is None
    assert isinstance(decoded[2].error, UnsupportedMediaError)  # the same bytes: the same failure
    assert decoded[1].error is None and decoded[1].image is not None


def test_a_size_the_geometry_refuses_fails_its_item_only() -> None:
    png, size = _encoded(5, "PNG", (300, 300))
    odd, odd_size = _encoded(6, "PNG", (301, 300))

    def even_only(image_size: tuple[int, int]) -> tuple[int, int]:
        if image_size[0] % 2:
            raise ValueError("odd width")
        return _half(image_size)

    decoded = BatchDecoder(even_only, "bicubic", 2).decode([_item("p", png, size), _item("q", odd, odd_size)])
    assert decoded[0].error is None and decoded[0].image is not None
    assert isinstance(decoded[1].error, ValueError) and decoded[1].image is None


def test_two_threads_decode_two_images_at_once(monkeypatch) -> None:
    """Each decode waits at a barrier for another one: only a decoder that runs two at once gets past it."""
    real = batch_decoder.decode_for_model
    meeting_point = {"barrier": threading.Barrier(2, timeout=10)}

    def meeting(data, size, resample):
        meeting_point["barrier"].wait()
        return real(data, size, resample)

    monkeypatch.setattr(batch_decoder, "decode_for_model", meeting)
    items = [_item(str(i), *_encoded(10 + i, "PNG", (200, 200))) for i in range(4)]
    decoder = _decoder(2)
    decoded = decoder.decode(items)
    decoder.close()
    assert [d.error for d in decoded] == [None] * 4
    meeting_point["barrier"] = threading.Barrier(2, timeout=0.3)
    serial = _decoder(1).decode(items[:1])  # one at a time: the decode waits alone and gives up
    assert isinstance(serial[0].error, threading.BrokenBarrierError)


def test_an_eviction_during_a_batch_cannot_lose_a_reused_image(monkeypatch) -> None:
    monkeypatch.setattr(batch_decoder, "DECODED_CACHE_BYTES", 1)  # every new image evicts the older ones
    items = _batch()
    decoder = _decoder(2)
    decoder.decode(items[:1])
    decoded = decoder.decode(items)  # a is reused while b and d, decoded now, evict it
    decoder.close()
    assert [d.error for d in decoded] == [None] * 4
    assert decoded[0].image is decoded[2].image


def test_the_thread_count_defaults_to_one_per_four_cpus_and_is_a_setting(monkeypatch, tmp_path: Path) -> None:
    unlimited = tmp_path / "no-cpu.max"  # outside a container: no cgroup file
    monkeypatch.setattr(batch_decoder.os, "sched_getaffinity", lambda pid: set(range(2)))
    assert default_decode_threads(unlimited) == 1
    monkeypatch.setattr(batch_decoder.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_decode_threads(unlimited) == 4
    monkeypatch.setattr(batch_decoder.os, "sched_getaffinity", lambda pid: set(range(128)))
    assert default_decode_threads(unlimited) == 4
    limited = tmp_path / "cpu.max"
    limited.write_text("200000 100000\n")  # a container limited to 2 CPUs on a 128-core node
    assert cgroup_cpu_quota(limited) == 2.0 and default_decode_threads(limited) == 1
    limited.write_text("1250000 100000\n")  # 12.5 CPUs: 13 // 4
    assert default_decode_threads(limited) == 3
    limited.write_text("max 100000\n")
    assert cgroup_cpu_quota(limited) is None and default_decode_threads(limited) == 4
    monkeypatch.setenv("NUWA_WORKER_DECODE_THREADS", "3")
    assert Settings().worker_decode_threads == 3 and Settings().decode_threads == 2  # the API's pool is apart
    monkeypatch.setenv("NUWA_WORKER_DECODE_THREADS", "0")
    with pytest.raises(ValueError, match="worker_decode_threads"):
        Settings()
    monkeypatch.delenv("NUWA_WORKER_DECODE_THREADS")
    assert Settings().worker_decode_threads is None  # unset: `default_decode_threads()` in the worker
    with pytest.raises(ValueError):
        BatchDecoder(lambda size: None, "bicubic", 0)

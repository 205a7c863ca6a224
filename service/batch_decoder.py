"""The worker's image decoding for one batch: each distinct image once, several at a time, recent ones reused.

Why threads: a 12-megapixel JPEG takes 38-49 ms of libjpeg entropy decoding (BENCHMARKS 7.1), and a batch of 8
of them decoded one after another is about 300 ms of the reader thread, as long as a GPU might take for the
batch itself, and the device waits whenever the decoder is the slower of the two. Pillow (and hashlib) release
the GIL while they work, so `NUWA_WORKER_DECODE_THREADS` threads decode that many images at once: 8 such JPEGs
take 302 -> 152 ms with 2 threads on a 2-vCPU machine (`bench/decode_threads.py`, BENCHMARKS 7.1.4). The cost
is memory: up to that many images are being decoded at a time, a JPEG at most at about twice the model's size
(`draft`), other formats as a full raster (3 bytes per pixel, `NUWA_MAX_IMAGE_PIXELS` at most) for a moment.

Why once per image: a request with several phrases arrives as several items with the same bytes, and chat
clients resend the same image every turn; a decoded image is kept among the recent ones (`DECODED_CACHE_BYTES`)
and reused. Only the reader thread calls `decode`, and it decodes too (the pool has one thread fewer than the
setting), so a lone image never waits for a thread hand-off.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from service.images import decode_for_model
from service.messages import WorkItem

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
"""The cgroup v2 CPU limit of this process's container (absent outside one, or under cgroup v1)."""

DECODED_CACHE_BYTES = 64 * 1024 * 1024
"""Decoded images kept for reuse (they are at most the model's decode size each)."""

_Key = tuple[str, tuple[int, int] | None]  # (content digest, decode size)
_T = TypeVar("_T")

DecodeSize = Callable[[tuple[int, int]], tuple[int, int] | None]
"""The model's decode size for an image's (upright) size (`Geometry.decode_size`)."""


def default_decode_threads(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """One decoder per four CPUs this process may use, 1 to 4: a 2-vCPU machine keeps one decoder next to the
    model's threads, a 16-core GPU host gets four.

    "May use" is the smaller of the CPUs it may run on and its cgroup's CPU quota: a container limited to 2 CPUs
    on a 64-core node sees 64 CPUs in its affinity mask but gets 2 CPUs' time (Kubernetes' `limits.cpu`).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_cpu_max)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, min(4, cpus // 4))


def cgroup_cpu_quota(cpu_max: Path = CGROUP_CPU_MAX) -> float | None:
    """CPUs' worth of time the cgroup (v2) allows, from `cpu.max` ("quota period", or "max ..."); None: no limit
    or no such file."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Decoded:
    """One item's image, or the error its decoding raised, and the seconds of work that were this item's.

    `digest` is the content hash of the image's bytes (the embedding cache's key); `seconds` covers hashing it
    and, for the first item of an image decoded in this batch, the decode itself (an image reused from the recent
    ones or from an earlier item of the batch costs its hash only). Exactly one of `image` and `error` is set.
    """

    digest: str
    image: Image.Image | None
    error: Exception | None
    seconds: float


class BatchDecoder:
    """Decodes a batch's images (see the module docstring).

    The caller's thread works too: `threads - 1` pool threads and the caller take the next image from one list
    until none is left, so a lone image is decoded in the caller's thread without a hand-off (the latency of a
    single request does not change) and a batch keeps `threads` decodes going.

    Args:
        decode_size: The model geometry's decode size for an image size.
        resample: The geometry's resize filter.
        threads: Images decoded at once (1: in the caller's thread only, no pool).
    """

    def __init__(self, decode_size: DecodeSize, resample: str, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._decode_size = decode_size
        self._resample = resample
        self.threads = threads
        self._pool = (
            ThreadPoolExecutor(threads - 1, thread_name_prefix="nuwa-decode") if threads > 1 else None
        )
        self._recent: OrderedDict[_Key, Image.Image] = OrderedDict()
        self._recent_bytes = 0

    def decode(self, items: Sequence[WorkItem]) -> list[Decoded]:
        """Every item's image, in item order; each distinct (bytes, size) decoded at most once, in parallel."""
        digests: list[tuple[str, float]] = []
        # Hashing is shared out too (hashlib frees the GIL); it does not fail, and should it, it is no one item's.
        for hashed in self._shared([(_timed_digest, (item.image.data,)) for item in items]):
            if isinstance(hashed, Exception):
                raise hashed
            digests.append(hashed)
        keys: list[_Key | Exception] = []
        for (image_digest, _), item in zip(digests, items, strict=True):
            try:
                keys.append((image_digest, self._decode_size(item.image.size)))
            except Exception as exc:  # a size the geometry refuses fails its item, as a failed decode does
                keys.append(exc)
        reused: dict[_Key, Image.Image] = {}  # taken now: a later `_remember` may evict them from `_recent`
        first_of: dict[_Key, int] = {}  # images to decode now: the first item of each
        for index, key in enumerate(keys):
            if isinstance(key, Exception) or key in reused or key in first_of:
                continue
            if (image := self._recent.get(key)) is not None:
                self._recent.move_to_end(key)
                reused[key] = image
            else:
                first_of[key] = index
        jobs = [(self._timed_decode, (items[index].image.data, key[1])) for key, index in first_of.items()]
        fresh = dict(zip(first_of, self._shared(jobs), strict=True))
        outcomes: list[Decoded] = []
        for index, key in enumerate(keys):
            image_digest, seconds = digests[index]
            if isinstance(key, Exception):
                outcomes.append(Decoded(image_digest, None, key, seconds))
                continue
            if key in reused:
                outcomes.append(Decoded(image_digest, reused[key], None, seconds))
                continue
            result = fresh[key]
            if isinstance(result, Exception):  # this item fails, and every item with the same image
                outcomes.append(Decoded(image_digest, None, result, seconds))
                continue
            image, decode_s = result
            # The item that decoded the image carries the decode time; the others reuse it.
            if first_of[key] == index:
                self._remember(key, image)
                seconds += decode_s
            outcomes.append(Decoded(image_digest, image, None, seconds))
        return outcomes

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _shared(self, jobs: Sequence[tuple[Callable[..., _T], tuple[Any, ...]]]) -> list[_T | Exception]:
        """Each job's result (or the exception it raised), in order; the pool threads and the caller share them."""
        results: list[_T | Exception | None] = [None] * len(jobs)
        claims = itertools.count()  # `next` on it is atomic under the GIL: each index is claimed once

        def work() -> None:
            while (index := next(claims)) < len(jobs):
                function, arguments = jobs[index]
                try:
                    results[index] = function(*arguments)
                except Exception as exc:  # one image's failure, reported with that image
                    results[index] = exc

        helpers = []
        if self._pool is not None and len(jobs) > 1:
            helpers = [self._pool.submit(work) for _ in range(min(self.threads - 1, len(jobs) - 1))]
        work()
        for helper in helpers:
            helper.result()
        return results  # type: ignore[return-value]  (every index was claimed and filled)

    def _timed_decode(self, data: bytes, size: tuple[int, int] | None) -> tuple[Image.Image, float]:
        start = time.monotonic()
        image = decode_for_model(data, size, self._resample)
        return image, time.monotonic() - start

    def _remember(self, key: _Key, image: Image.Image) -> None:
        self._recent[key] = image
        self._recent_bytes += image_bytes(image)
        while self._recent_bytes > DECODED_CACHE_BYTES and len(self._recent) > 1:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= image_bytes(old)


def _timed_digest(data: bytes) -> tuple[str, float]:
    start = time.monotonic()
    return digest(data), time.monotonic() - start


def digest(data: bytes) -> str:
    """The content hash of an image's bytes (128-bit BLAKE2b)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def image_bytes(image: Image.Image) -> int:
    return image.size[0] * image.size[1] * len(image.getbands())


__all__ = [
    "cgroup_cpu_quota",
    "DECODED_CACHE_BYTES",
    "BatchDecoder",
    "Decoded",
    "default_decode_threads",
    "digest",
    "image_bytes",
]

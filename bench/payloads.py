"""Request bodies for the serving benchmarks: every request its own image, unless a benchmark wants repeats.

Why distinct images: the worker caches vision outputs by a hash of the image BYTES, so a benchmark that cycles
through a few images measures cache hits, not the model. `distinct_scenes` renders one contract scene per seed
(336 px PNG, its own phrase); seed ranges of different runs must not overlap (`SeedBlock` hands them out).

`large_jpeg` makes the 12-megapixel case: a contract scene scaled up to 4000x3000 with sensor-like noise, JPEG
q=90 (a photo-sized upload). `with_comment` gives the same pixels new bytes (a JPEG COM segment or a PNG tEXt
chunk), so a repeated large image is still a cache miss without encoding it again.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bench.loadgen import Payload

SCENE_SIDE = 336
LARGE_SIZE = (4000, 3000)


def scene_png(seed: int, side: int = SCENE_SIDE) -> tuple[bytes, str, list[str]]:
    """The contract scene of `seed` as PNG bytes, its grounding phrase, and every valid phrase of the scene."""
    from models.builtin.scenes import grounding_phrases, make_grounding_item, render

    item = make_grounding_item(random.Random(seed), side)
    buffer = io.BytesIO()
    render(item.scene).save(buffer, format="PNG")
    return buffer.getvalue(), item.phrase, [phrase for phrase, _ in grounding_phrases(item.scene)]


def distinct_scenes(first_seed: int, count: int, fields: dict[str, str] | None = None) -> list[Payload]:
    """`count` /ground requests, one scene each (seeds first_seed .. first_seed + count - 1)."""
    payloads = []
    for seed in range(first_seed, first_seed + count):
        data, phrase, _ = scene_png(seed)
        payloads.append(Payload(data, phrase, dict(fields or {})))
    return payloads


@dataclass
class SeedBlock:
    """Hands out disjoint seed ranges, so no two runs of one benchmark share an image (no cross-run cache hits)."""

    next_seed: int = 1_000

    def take(self, count: int) -> int:
        first = self.next_seed
        self.next_seed += count
        return first


def large_jpeg(seed: int = 0, size: tuple[int, int] = LARGE_SIZE, quality: int = 90) -> tuple[bytes, str]:
    """A contract scene scaled to `size` (bicubic) plus Gaussian noise (sigma 6), as a JPEG; and its phrase."""
    from models.builtin.scenes import make_grounding_item, render

    item = make_grounding_item(random.Random(seed), SCENE_SIDE)
    scaled = render(item.scene).resize(size, Image.Resampling.BICUBIC)
    rng = np.random.default_rng(seed)
    pixels = np.asarray(scaled, dtype=np.int16) + rng.normal(0, 6, (size[1], size[0], 1)).astype(np.int16)
    noisy = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    noisy.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), item.phrase


def with_comment(data: bytes, tag: str) -> bytes:
    """The same image with `tag` embedded (JPEG COM segment after SOI, PNG tEXt chunk after IHDR): new bytes,
    same pixels, so the embedding cache sees a new image while decoding costs exactly the same."""
    text = tag.encode()
    if data[:2] == b"\xff\xd8":
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + data[2:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        ihdr_end = 8 + 8 + 13 + 4
        body = b"Comment\x00" + text
        chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
        return data[:ihdr_end] + chunk + data[ihdr_end:]
    raise ValueError("with_comment handles JPEG and PNG only")


__all__ = ["LARGE_SIZE", "SeedBlock", "distinct_scenes", "large_jpeg", "scene_png", "with_comment"]

"""An LRU of vision-encoder outputs, bounded in bytes: a repeated image skips the vision tower.

Why: grounding users send the same screenshot or photo with several phrases, and chat clients resend the image
with every turn. The vision tower (not pruned by Nüwa) is a large share of a request's cost, so its output for an
image is kept: everything stage 1 needs (features, salience, similarity features, key norms, grid) per image and
per similarity-layer range (the only request option that changes what the encoder side produces). The caller's key
must name everything else that changes the vision output: the image's bytes (a content hash) and the model and
processor settings (one cache belongs to one loaded model). A hit returns the very tensors the miss produced, so
its result is bit-identical to the miss's (tested for every method).

Only the worker's compute thread uses a cache; the counters are plain ints, readable from another thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.engine import EncodedImage


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was made (hits, misses, evictions) and what it holds now."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    capacity_bytes: int


def encoded_nbytes(encoded: EncodedImage) -> int:
    """Bytes held by one cached image's tensors."""
    tensors = [encoded.features, encoded.salience, encoded.similarity, encoded.key_norm, encoded.distinct]
    return sum(int(t.numel() * t.element_size()) for t in tensors if t is not None)


class EmbeddingCache:
    """LRU of `EncodedImage` by key, holding at most `capacity_bytes` of tensors.

    Args:
        capacity_bytes: Most bytes held; an entry larger than this is never stored. Must be > 0 (a disabled cache
            is no cache object at all).
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Hashable, tuple[EncodedImage, int]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable) -> EncodedImage | None:
        """The cached value (now the most recently used), or None; counts a hit or a miss."""
        return self.get_any([key])

    def get_any(self, keys: Sequence[Hashable]) -> EncodedImage | None:
        """The value of the first of `keys` that is cached (now the most recently used), or None; counts ONE hit
        or miss for the lookup (a request that can use any of several entries is one lookup)."""
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
        self.misses += 1
        return None

    def put(self, key: Hashable, encoded: EncodedImage) -> None:
        """Store `encoded`, evicting the least recently used entries until it fits."""
        size = encoded_nbytes(encoded)
        if size > self.capacity_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        while self._entries and self._bytes + size > self.capacity_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted
            self.evictions += 1
        self._entries[key] = (encoded, size)
        self._bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
            entries=len(self._entries),
            bytes=self._bytes,
            capacity_bytes=self.capacity_bytes,
        )


__all__ = ["CacheStats", "EmbeddingCache", "encoded_nbytes"]

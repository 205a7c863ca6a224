"""CPU work of the API process (large JSON, base64, image headers) on a small bounded pool, off the event loop.

Why bounded: a flood of large bodies must not spawn a thread each and starve the loop's own thread of the GIL;
a few workers queue the work instead, while /healthz and every other request keep being served. Small inputs
are handled inline: a thread hop costs more than parsing a few kilobytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

INLINE_BYTES = 64 * 1024
"""Inputs up to this size are parsed on the event loop (well under a millisecond)."""


class Offloader:
    """A `threads`-wide pool for CPU-bound parsing.

    Args:
        threads: Pool width (`NUWA_DECODE_THREADS`).
    """

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nuwa-cpu")

    async def run(self, size: int, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """`function(*args)`, inline when `size` (the input's bytes) is small, else on the pool."""
        if size <= INLINE_BYTES:
            return function(*args, **kwargs)
        return await self.in_pool(function, *args, **kwargs)

    async def in_pool(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """`function(*args)` on the pool, whatever the input's size."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: function(*args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["INLINE_BYTES", "Offloader"]

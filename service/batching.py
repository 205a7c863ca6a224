"""Dynamic batching, as plain functions: the pending queue, batch collection, and split-on-failure.

No torch and no process plumbing here, so each rule is unit-tested with small values:

* `PendingQueue` holds admitted, decoded requests in arrival order; a request whose client left or whose deadline
  passed is removed at once (`remove`), so it never reaches the worker.
* `collect_batch` waits for the first request, then returns up to `max_batch_size` requests as soon as the batch
  is full or the OLDEST request has waited `max_wait_s`, whichever comes first. Measuring the window from the
  oldest request's arrival means requests that queued while the worker was busy leave immediately.
* `run_splitting` runs a batch and, when it fails as a whole (CUDA out of memory, a bad per-request config),
  splits it in halves and retries, so only the request that cannot run alone fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
F = TypeVar("F")


@dataclass(eq=False)
class PendingItem(Generic[T]):
    """One queued request.

    Attributes:
        payload: What the dispatcher sends on (opaque here).
        enqueued_at: `time.monotonic()` when it entered the queue.
        deadline: `time.monotonic()` after which it must not start.
    """

    payload: T
    enqueued_at: float
    deadline: float
    extra: dict[str, object] = field(default_factory=dict)


class PendingQueue(Generic[T]):
    """FIFO of pending items with wake-ups for the single dispatcher that consumes it (event-loop only)."""

    def __init__(self) -> None:
        self._items: deque[PendingItem[T]] = deque()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: PendingItem[T]) -> None:
        self._items.append(item)
        self._changed.set()

    def remove(self, item: PendingItem[T]) -> bool:
        """Drop an item that is still waiting; False when it already left (taken into a batch)."""
        try:
            self._items.remove(item)
        except ValueError:
            return False
        self._changed.set()
        return True

    def oldest(self) -> PendingItem[T] | None:
        return self._items[0] if self._items else None

    def take(self, count: int) -> list[PendingItem[T]]:
        """Pop up to `count` items, oldest first."""
        taken = []
        while self._items and len(taken) < count:
            taken.append(self._items.popleft())
        return taken

    def take_all(self) -> list[PendingItem[T]]:
        return self.take(len(self._items))

    async def wait_changed(self, timeout_s: float | None = None) -> None:
        """Sleep until the next put/remove (or `timeout_s`)."""
        self._changed.clear()
        try:
            if timeout_s is None:
                await self._changed.wait()
            else:
                await asyncio.wait_for(self._changed.wait(), timeout=max(timeout_s, 0.0))
        except TimeoutError:
            pass


async def collect_batch(
    queue: PendingQueue[T],
    max_batch_size: int,
    max_wait_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> list[PendingItem[T]]:
    """Wait for a batch: full (`max_batch_size`) or the oldest item waited `max_wait_s`, whichever first.

    Args:
        queue: The pending queue (the caller is its only consumer).
        max_batch_size: Most items returned.
        max_wait_s: Longest the oldest item waits for company.
        clock: Monotonic clock in seconds (the items' `enqueued_at` uses the same one).

    Returns:
        1 to `max_batch_size` items, oldest first.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    while True:
        oldest = queue.oldest()
        if oldest is None:
            await queue.wait_changed()
            continue
        if len(queue) >= max_batch_size:
            return queue.take(max_batch_size)
        remaining = oldest.enqueued_at + max_wait_s - clock()
        if remaining <= 0:
            return queue.take(max_batch_size)
        await queue.wait_changed(remaining)


def split_expired(
    items: Sequence[PendingItem[T]], now: float
) -> tuple[list[PendingItem[T]], list[PendingItem[T]]]:
    """(live, expired): items whose deadline passed must not start."""
    live = [item for item in items if item.deadline > now]
    expired = [item for item in items if item.deadline <= now]
    return live, expired


def run_splitting(
    run: Callable[[Sequence[T]], Sequence[R]],
    items: Sequence[T],
    on_error: Callable[[T, BaseException], F],
    before_retry: Callable[[BaseException], None] | None = None,
) -> list[R | F]:
    """Run `items` as one batch; on failure split in halves and retry, down to single items.

    This is how a CUDA out-of-memory in a batch of 8 becomes, at worst, one failed request: the halves that fit
    still run, and only an item that fails alone is reported through `on_error`. The same path isolates a request
    whose config the engine refuses (ValueError), so it cannot fail its batch-mates.

    Args:
        run: Runs a batch; returns one result per item, in order.
        items: The batch.
        on_error: Builds the failure record of an item that failed when run alone.
        before_retry: Called with the exception before each split (e.g. to empty the CUDA cache).

    Returns:
        One result or failure per item, in order.
    """
    if not items:
        return []
    try:
        results = list(run(items))
        if len(results) != len(items):
            raise RuntimeError(f"engine returned {len(results)} results for {len(items)} requests")
        return results
    except Exception as exc:
        if len(items) == 1:
            return [on_error(items[0], exc)]
        logger.warning(
            "batch of %d failed (%s: %s); splitting and retrying", len(items), type(exc).__name__, exc
        )
        if before_retry is not None:
            before_retry(exc)
        middle = len(items) // 2
        return run_splitting(run, items[:middle], on_error, before_retry) + run_splitting(
            run, items[middle:], on_error, before_retry
        )


__all__ = ["PendingItem", "PendingQueue", "collect_batch", "run_splitting", "split_expired"]

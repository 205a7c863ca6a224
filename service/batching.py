"""Dynamic batching, as plain functions: the pending queue, batch collection, and split-on-failure.

No torch and no process plumbing here, so each rule is unit-tested with small values:

* `PendingQueue` holds admitted requests in arrival order; a request whose client left or whose deadline passed is
  removed at once (`remove`), so it never reaches the worker.
* `collect_batch` never makes a request wait while the worker is idle: it returns at once with what is queued.
  Only while the worker is busy does it gather company, until the batch is full (requests or visual tokens), the
  worker becomes idle, or the moment the next batch should leave so that its preparation (decode, preprocess)
  overlaps the end of the running batch (`leave_at`; `max_wait_s` after the oldest request before that moment
  can be estimated): so requests that queued during a running batch leave together, and no request waits for
  company once the worker could take it. (LitServe, by contrast, always waits its full `batch_timeout`.)
* `run_splitting` runs a batch and, when it fails as a whole (CUDA out of memory, a bad per-request config),
  splits it in halves and retries, so only the request that cannot run alone fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
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
        cost: Its estimated (unpruned) visual tokens, for the batch's token bound.
    """

    payload: T
    enqueued_at: float
    deadline: float
    cost: int = 0


class Notifier:
    """Wakes the single waiter when something changed (event-loop only; `wait` clears before it waits)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()

    def wait(self, timeout_s: float | None = None) -> Awaitable[None]:
        """An awaitable that returns at the next `notify` (or after `timeout_s`).

        The flag is cleared NOW, when `wait` is called, not when the awaitable first runs: a `notify` that lands
        between this call and the first await is not lost.
        """
        self._event.clear()
        return self._wait(timeout_s)

    async def _wait(self, timeout_s: float | None) -> None:
        try:
            await asyncio.wait_for(
                self._event.wait(), timeout=None if timeout_s is None else max(timeout_s, 0)
            )
        except TimeoutError:
            pass


class PendingQueue(Generic[T]):
    """FIFO of pending items with wake-ups for the single dispatcher that consumes it (event-loop only)."""

    def __init__(self) -> None:
        self._items: deque[PendingItem[T]] = deque()
        self.changed = Notifier()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: PendingItem[T]) -> None:
        self._items.append(item)
        self.changed.notify()

    def remove(self, item: PendingItem[T]) -> bool:
        """Drop an item that is still waiting; False when it already left (taken into a batch)."""
        try:
            self._items.remove(item)
        except ValueError:
            return False
        self.changed.notify()
        return True

    def oldest(self) -> PendingItem[T] | None:
        return self._items[0] if self._items else None

    def take(self, count: int, max_cost: int | None = None) -> list[PendingItem[T]]:
        """Pop up to `count` items, oldest first, within `max_cost` summed cost (the first item always goes)."""
        taken: list[PendingItem[T]] = []
        total = 0
        while self._items and len(taken) < count:
            cost = self._items[0].cost
            if taken and max_cost is not None and total + cost > max_cost:
                break
            taken.append(self._items.popleft())
            total += cost
        return taken

    def take_all(self) -> list[PendingItem[T]]:
        return self.take(len(self._items))

    def batch_is_full(self, count: int, max_cost: int | None = None) -> bool:
        """Whether the queue already holds a full batch (`count` items, or `max_cost` summed cost)."""
        if len(self._items) >= count:
            return True
        if max_cost is None:
            return False
        return sum(item.cost for item in self._items) >= max_cost


async def collect_batch(
    queue: PendingQueue[T],
    max_batch_size: int,
    max_wait_s: float,
    busy: Callable[[], bool],
    busy_changed: Notifier,
    max_cost: int | None = None,
    leave_at: Callable[[], float | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[PendingItem[T]]:
    """The next batch: at once while the worker is idle; while it is busy, when it is full or when it should
    leave so that its preparation ends as the running batch does.

    Args:
        queue: The pending queue (the caller is its only consumer).
        max_batch_size: Most items returned.
        max_wait_s: While busy and with no `leave_at` estimate yet: the longest the oldest item waits for company.
        busy: Whether the worker is running a batch now.
        busy_changed: Notified when `busy()` may have changed (a batch finished).
        max_cost: Most summed cost (visual tokens) in one batch; a single costlier item goes alone.
        leave_at: While busy: the clock time at which the next batch should leave (the running batch's expected
            end minus the time the worker needs to prepare the next one), or None when not known yet. Requests
            that queue during a running batch then leave together, just early enough for their preparation to
            overlap its end, instead of in small batches every `max_wait_s`.
        clock: Monotonic clock in seconds (the items' `enqueued_at` uses the same one).

    Returns:
        1 to `max_batch_size` items, oldest first.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    while True:
        oldest = queue.oldest()
        if oldest is None:
            await queue.changed.wait()
            continue
        if not busy() or queue.batch_is_full(max_batch_size, max_cost):
            return queue.take(max_batch_size, max_cost)
        target = leave_at() if leave_at is not None else None
        if target is None:
            target = oldest.enqueued_at + max_wait_s
        remaining = target - clock()
        if remaining <= 0:
            return queue.take(max_batch_size, max_cost)
        await _first_of(queue.changed.wait(remaining), busy_changed.wait(remaining))


async def _first_of(*waits: Awaitable[None]) -> None:
    """Return when the first of the waits returns (the others are cancelled)."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


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


__all__ = ["Notifier", "PendingItem", "PendingQueue", "collect_batch", "run_splitting", "split_expired"]

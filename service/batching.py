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
* `FollowUps` learns whether requests arrive right after a batch completes (closed-loop clients that send the
  next request when the last one is answered do; independent traffic arrives spread over a batch's run). When
  they do, a batch that is not full waits for the running batch's clients (`hold_until`): until it ends, then
  until as many came back as usually do, at most `max_wait_s` after the first of them (and never more than
  `FOLLOW_UP_WINDOWS * max_wait_s` after the completion), so they join it instead of splitting the load into
  alternating small batches.
* `run_splitting` runs a batch and, when it fails as a whole (CUDA out of memory, a bad per-request config),
  splits it in halves and retries, so only the request that cannot run alone fails.
"""

from __future__ import annotations

import asyncio
import logging
import math
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


class FollowUps:
    """Whether clients send their next request right after their answer (closed loop), and how many come back.

    Why: with pipelining, a batch leaves just before the running one ends, so the clients that the running batch
    answers (and that send their next request at once) miss it and form the batch after. Four closed-loop clients
    then alternate in batches of two, while a fixed 10 ms window (LitServe) gathers all four. Holding a batch for
    them pays only when they really come back. Per completed batch this counts the arrivals within `window_s`
    after it (its follow-ups) and all arrivals until the next completion: closed-loop clients arrive almost only
    in that window (`share` near 1); independent traffic arrives spread over the batch's run (`share` about
    `window_s` / run time), so it is never held.

    Attributes:
        wait_s: Once the first follow-up arrived, how long the batch waits for the others (`max_wait_ms`).
        window_s: How long after a completion an arrival counts as its follow-up, and the longest hold after it.
        smoothing: Weight of the newest completion in the running estimates.
        share: Smoothed share of arrivals that were follow-ups, 0..1.
        expected: Smoothed follow-ups per completion.
        completed_at: When the last batch was answered (None before the first).
        first_arrival_at: The first follow-up of that completion, if any yet.
        arrivals: Follow-ups of that completion so far.
    """

    CLOSED_LOOP_SHARE = 0.8
    """Share of follow-ups above which arrivals are treated as closed-loop clients coming back."""

    def __init__(self, wait_s: float, window_s: float | None = None, smoothing: float = 0.5) -> None:
        self.wait_s = wait_s
        self.window_s = window_s if window_s is not None else FOLLOW_UP_WINDOWS * wait_s
        self.smoothing = smoothing
        self.share = 0.0
        self.expected = 0.0
        self.completed_at: float | None = None
        self.first_arrival_at: float | None = None
        self.arrivals = 0
        self._cycle_arrivals = 0

    def arrived(self, now: float) -> None:
        """Count one arrival (call for every accepted request)."""
        self._cycle_arrivals += 1
        if self.completed_at is not None and now - self.completed_at <= self.window_s:
            self.arrivals += 1
            if self.first_arrival_at is None:
                self.first_arrival_at = now

    def completed(self, now: float) -> None:
        """A batch was answered at `now`: fold the last cycle in, open a new one."""
        if self.completed_at is not None and self._cycle_arrivals > 0:
            self.share += self.smoothing * (self.arrivals / self._cycle_arrivals - self.share)
            self.expected += self.smoothing * (self.arrivals - self.expected)
        self.completed_at, self.first_arrival_at, self.arrivals, self._cycle_arrivals = now, None, 0, 0

    @property
    def expected_back(self) -> int:
        """Follow-ups to expect after a completion: 0 unless the clients look closed-loop."""
        return round(self.expected) if self.share >= self.CLOSED_LOOP_SHARE else 0

    def hold_deadline(self) -> float | None:
        """After the last completion: `wait_s` after its first follow-up, and never past `window_s` after it."""
        if self.completed_at is None:
            return None
        cap = self.completed_at + self.window_s
        if self.first_arrival_at is None:
            return cap
        return min(cap, self.first_arrival_at + self.wait_s)


FOLLOW_UP_WINDOWS = 5
"""`FollowUps.window_s` in units of `max_wait_ms`: a client's next request crosses HTTP, parsing and admission
after its answer went out, which takes a few milliseconds more than the batching window itself."""


def hold_until(
    follow_ups: FollowUps, queued: int, max_batch_size: int, running: bool, now: float
) -> float | None:
    """Until when a batch of `queued` should wait for closed-loop follow-ups (`math.inf`: until the running batch
    ends); None when it should leave now. Never when the batch is full or no follow-ups are expected.

    Args:
        follow_ups: The estimate (`FollowUps`).
        queued: Requests waiting.
        max_batch_size: Most requests in one batch.
        running: Whether a batch is running in the worker (its clients come back when it ends).
        now: The clock.
    """
    expected = follow_ups.expected_back
    if expected < 1 or queued >= max_batch_size:
        return None
    if running:
        return math.inf
    until = follow_ups.hold_deadline()
    if until is None or now >= until or follow_ups.arrivals >= expected:
        return None
    return until


async def collect_batch(
    queue: PendingQueue[T],
    max_batch_size: int,
    max_wait_s: float,
    busy: Callable[[], bool],
    busy_changed: Notifier,
    max_cost: int | None = None,
    leave_at: Callable[[], float | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    hold: Callable[[int], float | None] | None = None,
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
        hold: Given the queued count, until when a batch that would leave now should wait for the clients the
            running (or just finished) batch answers (`hold_until`; `math.inf` = until the worker is idle), or
            None to leave. Never delays a full batch.

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
        if queue.batch_is_full(max_batch_size, max_cost):
            return queue.take(max_batch_size, max_cost)
        if busy():
            target = leave_at() if leave_at is not None else None
            if target is None:
                target = oldest.enqueued_at + max_wait_s
            remaining = target - clock()
            if remaining > 0:
                await _first_of(queue.changed.wait(remaining), busy_changed.wait(remaining))
                continue
        # The batch would leave now, unless it waits for the clients the running (or last) batch answers.
        until = hold(len(queue)) if hold is not None else None
        remaining = 0.0 if until is None else until - clock()
        if remaining <= 0:
            return queue.take(max_batch_size, max_cost)
        timeout = None if math.isinf(remaining) else remaining  # inf: until the running batch ends
        await _first_of(queue.changed.wait(timeout), busy_changed.wait(timeout))


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

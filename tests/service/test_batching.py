"""Dynamic batching rules: no wait when idle; while busy, full batch / oldest item's wait / batch end; token
bound, removal, expiry, split-on-failure."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.batching import (
    FollowUps,
    Notifier,
    PendingItem,
    PendingQueue,
    collect_batch,
    hold_until,
    run_splitting,
    split_expired,
)


def _item(value: int, enqueued_at: float | None = None, deadline: float = float("inf")) -> PendingItem[int]:
    return PendingItem(
        payload=value, enqueued_at=time.monotonic() if enqueued_at is None else enqueued_at, deadline=deadline
    )


class _Worker:
    """Stands in for the scheduler's view of the worker: busy or idle, and the notifier for changes."""

    def __init__(self, busy: bool) -> None:
        self.busy = busy
        self.changed = Notifier()

    def set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.changed.notify()


async def _collect(queue: PendingQueue[int], worker: _Worker, **kwargs: object) -> list[PendingItem[int]]:
    options = {"max_batch_size": 8, "max_wait_s": 5.0, **kwargs}
    return await collect_batch(
        queue,
        busy=lambda: worker.busy,
        busy_changed=worker.changed,
        **options,  # type: ignore[arg-type]
    )


def test_an_idle_worker_gets_a_lone_request_at_once() -> None:
    async def scenario() -> tuple[list[int], float]:
        queue: PendingQueue[int] = PendingQueue()
        queue.put(_item(1))
        start = time.monotonic()
        batch = await _collect(queue, _Worker(busy=False), max_wait_s=5.0)
        return [item.payload for item in batch], time.monotonic() - start

    payloads, waited = asyncio.run(scenario())
    assert payloads == [1]
    assert waited < 0.5  # no batching window while idle (the window here is 5 s)


def test_an_idle_worker_waits_for_the_first_request_only() -> None:
    async def scenario() -> tuple[list[int], float]:
        queue: PendingQueue[int] = PendingQueue()
        start = time.monotonic()

        async def arrival() -> None:
            await asyncio.sleep(0.05)
            queue.put(_item(7))

        task = asyncio.create_task(arrival())
        batch = await _collect(queue, _Worker(busy=False))
        await task
        return [item.payload for item in batch], time.monotonic() - start

    payloads, waited = asyncio.run(scenario())
    assert payloads == [7]
    assert 0.04 <= waited < 0.5


def test_a_full_batch_leaves_without_waiting_while_busy() -> None:
    async def scenario() -> tuple[list[int], float]:
        queue: PendingQueue[int] = PendingQueue()
        for value in range(5):
            queue.put(_item(value))
        start = time.monotonic()
        batch = await _collect(queue, _Worker(busy=True), max_batch_size=4, max_wait_s=5.0)
        return [item.payload for item in batch], time.monotonic() - start

    payloads, waited = asyncio.run(scenario())
    assert payloads == [0, 1, 2, 3]
    assert waited < 0.5


def test_while_busy_requests_gather_until_the_oldest_waited_max_wait() -> None:
    async def scenario() -> tuple[list[int], float]:
        queue: PendingQueue[int] = PendingQueue()
        start = time.monotonic()
        queue.put(_item(1))

        async def late_arrival() -> None:
            await asyncio.sleep(0.05)
            queue.put(_item(2))

        task = asyncio.create_task(late_arrival())
        batch = await _collect(queue, _Worker(busy=True), max_wait_s=0.2)
        await task
        return [item.payload for item in batch], time.monotonic() - start

    payloads, waited = asyncio.run(scenario())
    assert payloads == [1, 2]
    assert 0.15 <= waited < 1.0


def test_requests_queued_during_a_batch_leave_together_when_it_ends() -> None:
    async def scenario() -> tuple[list[int], float]:
        queue: PendingQueue[int] = PendingQueue()
        worker = _Worker(busy=True)
        for value in (1, 2, 3):
            queue.put(_item(value))
        start = time.monotonic()

        async def batch_ends() -> None:
            await asyncio.sleep(0.05)
            worker.set_busy(False)

        task = asyncio.create_task(batch_ends())
        batch = await _collect(queue, worker, max_wait_s=5.0)
        await task
        return [item.payload for item in batch], time.monotonic() - start

    payloads, waited = asyncio.run(scenario())
    assert payloads == [1, 2, 3]
    assert 0.04 <= waited < 0.5  # at the end of the running batch, long before max_wait


def test_items_that_already_waited_leave_at_once() -> None:
    async def scenario() -> tuple[int, float]:
        queue: PendingQueue[int] = PendingQueue()
        queue.put(_item(1, enqueued_at=time.monotonic() - 10.0))
        start = time.monotonic()
        batch = await _collect(queue, _Worker(busy=True), max_wait_s=1.0)
        return len(batch), time.monotonic() - start

    size, waited = asyncio.run(scenario())
    assert size == 1
    assert waited < 0.2


def test_the_batch_token_bound_splits_batches_but_a_big_request_goes_alone() -> None:
    async def scenario() -> list[list[int]]:
        queue: PendingQueue[int] = PendingQueue()
        for value, cost in ((1, 600), (2, 600), (3, 600), (4, 5000), (5, 10)):
            queue.put(
                PendingItem(payload=value, enqueued_at=time.monotonic(), deadline=float("inf"), cost=cost)
            )
        worker = _Worker(busy=False)
        batches = []
        for _ in range(3):
            batches.append([item.payload for item in await _collect(queue, worker, max_cost=1500)])
        return batches

    assert asyncio.run(scenario()) == [[1, 2], [3], [4]]


def test_removed_item_never_reaches_a_batch() -> None:
    async def scenario() -> list[int]:
        queue: PendingQueue[int] = PendingQueue()
        gone = _item(1)
        queue.put(gone)
        queue.put(_item(2))
        assert queue.remove(gone) is True
        assert queue.remove(gone) is False
        return [item.payload for item in await _collect(queue, _Worker(busy=False))]

    assert asyncio.run(scenario()) == [2]


def test_split_expired() -> None:
    now = 100.0
    live, expired = split_expired([_item(1, deadline=99.0), _item(2, deadline=101.0)], now)
    assert [i.payload for i in live] == [2]
    assert [i.payload for i in expired] == [1]


def test_collect_batch_rejects_zero_batch_size() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        asyncio.run(_collect(PendingQueue(), _Worker(busy=False), max_batch_size=0, max_wait_s=0.1))


class _MemoryLimitedEngine:
    """Fails any batch whose total 'size' exceeds a budget, like a device running out of memory."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.calls: list[list[int]] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        if sum(items) > self.budget:
            raise RuntimeError("CUDA out of memory")
        return [value * 10 for value in items]


def test_run_splitting_isolates_the_request_that_cannot_fit() -> None:
    engine = _MemoryLimitedEngine(budget=10)
    retries: list[str] = []
    results = run_splitting(
        engine,
        [3, 3, 20, 3],
        on_error=lambda item, exc: f"failed {item}: {exc}",
        before_retry=lambda e: retries.append(str(e)),
    )
    assert results == [30, 30, "failed 20: CUDA out of memory", 30]
    assert engine.calls[0] == [3, 3, 20, 3]
    assert retries  # the cache-emptying hook ran before retrying


def test_run_splitting_passes_a_good_batch_through_once() -> None:
    engine = _MemoryLimitedEngine(budget=100)
    assert run_splitting(engine, [1, 2, 3], on_error=lambda item, exc: None) == [10, 20, 30]
    assert len(engine.calls) == 1


def test_run_splitting_treats_a_short_answer_as_a_failure() -> None:
    def drops_one(items: list[int]) -> list[int]:
        return [0] * max(len(items) - 1, 1) if len(items) > 1 else [len(items)]

    assert run_splitting(drops_one, [7, 8], on_error=lambda item, exc: -1) == [1, 1]


def test_while_busy_the_batch_leaves_at_the_estimated_moment_not_after_max_wait() -> None:
    """With an estimate of the running batch's end, requests gather until then, even past `max_wait_s`: sending
    them earlier would only split them into smaller batches the worker could not start any sooner."""

    async def scenario() -> tuple[list[int], float]:
        queue: PendingQueue[int] = PendingQueue()
        start = time.monotonic()
        queue.put(_item(1))

        async def arrivals() -> None:
            for value in (2, 3):
                await asyncio.sleep(0.08)
                queue.put(_item(value))

        task = asyncio.create_task(arrivals())
        batch = await _collect(queue, _Worker(busy=True), max_wait_s=0.05, leave_at=lambda: start + 0.3)
        await task
        return [item.payload for item in batch], time.monotonic() - start

    payloads, waited = asyncio.run(scenario())
    assert payloads == [1, 2, 3]  # max_wait alone would have sent [1] after 0.05 s
    assert 0.28 <= waited < 1.0


def test_an_estimated_moment_in_the_past_sends_at_once() -> None:
    async def scenario() -> tuple[list[int], float]:
        queue: PendingQueue[int] = PendingQueue()
        queue.put(_item(1))
        start = time.monotonic()
        batch = await _collect(queue, _Worker(busy=True), max_wait_s=5.0, leave_at=lambda: start - 1.0)
        return [item.payload for item in batch], time.monotonic() - start

    payloads, waited = asyncio.run(scenario())
    assert payloads == [1]
    assert waited < 0.2


def test_without_an_estimate_max_wait_still_bounds_the_wait() -> None:
    async def scenario() -> tuple[list[int], float]:
        queue: PendingQueue[int] = PendingQueue()
        queue.put(_item(1))
        start = time.monotonic()
        batch = await _collect(queue, _Worker(busy=True), max_wait_s=0.1, leave_at=lambda: None)
        return [item.payload for item in batch], time.monotonic() - start

    payloads, waited = asyncio.run(scenario())
    assert payloads == [1]
    assert 0.09 <= waited < 1.0


def test_the_batch_end_wins_over_a_later_estimate() -> None:
    async def scenario() -> tuple[list[int], float]:
        queue: PendingQueue[int] = PendingQueue()
        worker = _Worker(busy=True)
        queue.put(_item(1))
        start = time.monotonic()

        async def batch_ends() -> None:
            await asyncio.sleep(0.05)
            worker.set_busy(False)

        task = asyncio.create_task(batch_ends())
        batch = await _collect(queue, worker, max_wait_s=5.0, leave_at=lambda: start + 5.0)
        await task
        return [item.payload for item in batch], time.monotonic() - start

    payloads, waited = asyncio.run(scenario())
    assert payloads == [1]
    assert 0.04 <= waited < 0.5


def _closed_loop(rounds: int, size: int = 4, wait_s: float = 0.01) -> FollowUps:
    """An estimate that has seen `rounds` batches of `size` whose every client came back 3 ms later."""
    follow_ups = FollowUps(wait_s=wait_s)
    now = 100.0
    for _ in range(rounds):
        follow_ups.completed(now)
        for _ in range(size):
            follow_ups.arrived(now + 0.003)
        now += 0.2
    return follow_ups


def test_follow_ups_learn_closed_loop_clients_and_ignore_independent_traffic() -> None:
    closed = _closed_loop(rounds=8)
    closed.completed(300.0)
    assert closed.share > 0.95 and closed.expected_back == 4
    independent = FollowUps(wait_s=0.01)
    now = 100.0
    for _ in range(40):  # a batch every 200 ms; 4 arrivals per batch spread over its run, one in the window
        independent.completed(now)
        for offset in (0.02, 0.07, 0.12, 0.17):
            independent.arrived(now + offset)
        now += 0.2
    assert independent.share < 0.3 and independent.expected_back == 0
    fresh = FollowUps(wait_s=0.01)
    assert fresh.expected_back == 0  # nothing learned: nothing held


def test_hold_until_waits_for_the_running_batch_then_for_its_clients_at_most_max_wait() -> None:
    follow_ups = _closed_loop(rounds=8)
    done = 200.0
    follow_ups.completed(done)  # a batch of 4 just answered; none of its clients back yet
    assert hold_until(follow_ups, queued=2, max_batch_size=8, running=True, now=done) == float("inf")
    assert hold_until(follow_ups, queued=8, max_batch_size=8, running=True, now=done) is None  # full: go
    cap = done + follow_ups.window_s
    assert hold_until(follow_ups, queued=2, max_batch_size=8, running=False, now=done) == pytest.approx(cap)
    follow_ups.arrived(done + 0.004)  # the first client is back: the others get max_wait from now on
    until = hold_until(follow_ups, queued=3, max_batch_size=8, running=False, now=done + 0.004)
    assert until == pytest.approx(done + 0.014)
    assert hold_until(follow_ups, queued=3, max_batch_size=8, running=False, now=done + 0.015) is None
    for _ in range(3):
        follow_ups.arrived(done + 0.005)
    assert (
        hold_until(follow_ups, queued=6, max_batch_size=8, running=False, now=done + 0.005) is None
    )  # all back
    fresh = FollowUps(wait_s=0.01)
    assert hold_until(fresh, queued=1, max_batch_size=8, running=False, now=1.0) is None  # zero idle wait


def test_a_batch_waits_for_the_clients_the_running_batch_answers() -> None:
    """Two pairs of closed-loop clients: the pair queued while the other pair's batch runs waits for it."""

    async def scenario() -> tuple[list[int], float]:
        queue: PendingQueue[int] = PendingQueue()
        follow_ups = _closed_loop(rounds=8, size=2, wait_s=0.05)
        worker = _Worker(busy=True)
        queue.put(_item(1))
        queue.put(_item(2))
        start = time.monotonic()

        def hold(queued: int) -> float | None:
            return hold_until(follow_ups, queued, 8, worker.busy, time.monotonic())

        async def batch_ends_and_its_clients_return() -> None:
            await asyncio.sleep(0.05)
            follow_ups.completed(time.monotonic())
            worker.set_busy(False)
            for value in (3, 4):
                await asyncio.sleep(0.005)
                follow_ups.arrived(time.monotonic())
                queue.put(_item(value))

        task = asyncio.create_task(batch_ends_and_its_clients_return())
        batch = await _collect(queue, worker, max_wait_s=5.0, leave_at=lambda: start, hold=hold)
        await task
        return [item.payload for item in batch], time.monotonic() - start

    payloads, waited = asyncio.run(scenario())
    assert payloads == [1, 2, 3, 4]  # one batch of 4, not 2 now and 2 later
    assert 0.06 <= waited < 1.0

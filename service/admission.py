"""Admission control: the queue is bounded in requests AND in estimated visual tokens, and degrades before it refuses.

A request is admitted (or refused with 429) right after its image header is read, before it is decoded or
queued, so a refused request costs nothing (serving-anchors: vLLM #58192). Measuring the queue in visual tokens
matters for VLMs because one 1000x1000 image can cost as much as ten small ones. A request holds its `Ticket`'s
queue share (one request, its visual tokens) until it is handed to the worker (or fails, or its client leaves);
the two depths are exported as gauges. Its image bytes are held by the API process until the answer, so the
ticket's byte share is released only then (`release_bytes`): the bound on bytes is the bound on what images can
cost the API process's memory, however many requests are in flight.

Load-adaptive degradation (`DegradationPolicy`): once the queue holds `start` requests, a NEW request's keep ratio
is lowered, linearly in the queue depth, from what it asked for down to its floor (its own `min_budget`, else the
configured floor), reached at depth `full`. Fewer visual tokens make prefill cheaper, so the worker drains the
queue faster exactly when it is long, and a request is answered with fewer tokens instead of being refused. Only
when the queue is at its hard bound does admission answer 429. The response says what was applied.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from models.budget import PruningConfig, keep_ratio_of
from models.methods import get_method
from service.errors import QueueFullError


@dataclass(eq=False)
class Ticket:
    """One admitted request's share of the queue and of image memory (both releases are idempotent)."""

    visual_tokens: int
    image_bytes: int = 0
    released: bool = False
    bytes_released: bool = False


class Admission:
    """Counts admitted requests and their estimated visual tokens against two bounds.

    Not thread-safe on purpose: every call happens on the API process's event loop.

    Args:
        max_requests: Most tickets held at once.
        max_visual_tokens: Most estimated visual tokens held at once. A single request larger than this bound is
            still admitted when the queue is empty, so no request is refused forever; it then runs alone.
        retry_after_s: Seconds a refused client is told to wait (Retry-After header).
        on_change: Called with (requests, visual_tokens) after every change, to update the depth gauges.
        max_image_bytes: Most encoded image bytes held at once (None: unbounded). A single larger image is still
            admitted when no other image is held.
    """

    def __init__(
        self,
        max_requests: int,
        max_visual_tokens: int,
        retry_after_s: int = 1,
        on_change: Callable[[int, int], None] | None = None,
        max_image_bytes: int | None = None,
    ) -> None:
        if max_requests < 1 or max_visual_tokens < 1:
            raise ValueError(
                f"bounds must be >= 1, got max_requests={max_requests}, max_visual_tokens={max_visual_tokens}"
            )
        self.max_requests = max_requests
        self.max_visual_tokens = max_visual_tokens
        self.retry_after_s = retry_after_s
        self._on_change = on_change
        self.max_image_bytes = max_image_bytes
        self._requests = 0
        self._visual_tokens = 0
        self._image_bytes = 0

    @property
    def requests(self) -> int:
        """Tickets currently held."""
        return self._requests

    @property
    def visual_tokens(self) -> int:
        """Estimated visual tokens currently held."""
        return self._visual_tokens

    @property
    def image_bytes(self) -> int:
        """Encoded image bytes currently held."""
        return self._image_bytes

    def try_admit(self, visual_tokens: int, image_bytes: int = 0) -> Ticket:
        """Take a ticket for a request of `visual_tokens` whose image is `image_bytes` long, or refuse.

        Raises:
            QueueFullError: code `queue_full_requests`, `queue_full_visual_tokens` or `queue_full_image_bytes`,
                with Retry-After.
        """
        if visual_tokens < 0:
            raise ValueError(f"visual_tokens must be >= 0, got {visual_tokens}")
        headers = {"Retry-After": str(self.retry_after_s)}
        if self._requests + 1 > self.max_requests:
            raise QueueFullError(
                f"queue full: {self._requests} of {self.max_requests} requests waiting; retry later",
                code="queue_full_requests",
                headers=headers,
            )
        if self._requests > 0 and self._visual_tokens + visual_tokens > self.max_visual_tokens:
            raise QueueFullError(
                f"queue full: {self._visual_tokens} estimated visual tokens waiting, this image needs "
                f"{visual_tokens}, the bound is {self.max_visual_tokens}; retry later",
                code="queue_full_visual_tokens",
                headers=headers,
            )
        limit = self.max_image_bytes
        if limit is not None and self._image_bytes > 0 and self._image_bytes + image_bytes > limit:
            raise QueueFullError(
                f"too many image bytes in flight: {self._image_bytes} held, this image has {image_bytes}, the "
                f"bound is {limit} (NUWA_MAX_QUEUE_IMAGE_BYTES); retry later",
                code="queue_full_image_bytes",
                headers=headers,
            )
        self._requests += 1
        self._visual_tokens += visual_tokens
        self._image_bytes += image_bytes
        self._changed()
        return Ticket(visual_tokens=visual_tokens, image_bytes=image_bytes)

    def release(self, ticket: Ticket) -> None:
        """Give the ticket's queue share back (it left the queue); a second release does nothing."""
        if ticket.released:
            return
        ticket.released = True
        self._requests -= 1
        self._visual_tokens -= ticket.visual_tokens
        self._changed()

    def release_bytes(self, ticket: Ticket) -> None:
        """Give the ticket's image bytes back (the request was answered); a second release does nothing."""
        if ticket.bytes_released:
            return
        ticket.bytes_released = True
        self._image_bytes -= ticket.image_bytes

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._requests, self._visual_tokens)


@dataclass(frozen=True)
class Degradation:
    """What load-adaptive degradation did to one request (reported in its response).

    Attributes:
        requested_budget: The budget the request ran with before degradation (None = keep every token).
        applied_budget: The budget it ran with: int = average visual tokens, float = keep ratio.
        floor_budget: The lowest budget it could have been given (its `min_budget`, else the configured floor).
        queue_depth: Requests waiting in the queue when it was admitted.
        level: 0..1, how far from the requested keep ratio towards the floor it was moved.
    """

    requested_budget: int | float | None
    applied_budget: int | float
    floor_budget: int | float
    queue_depth: int
    level: float


class DegradationPolicy:
    """Lower the keep ratio of new requests while the queue is long (see the module docstring).

    Args:
        start: Queue depth (waiting requests) at which degradation begins; 0 disables it.
        full: Queue depth at which a new request gets its floor; >= `start`.
        floor: Default floor keep ratio in (0, 1] for requests that send no `min_budget`.
    """

    def __init__(self, start: int, full: int, floor: float) -> None:
        if start < 0 or (start > 0 and full < start):
            raise ValueError(f"need 0 <= start <= full, got start={start}, full={full}")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"floor must be a keep ratio in (0, 1], got {floor}")
        self.start = start
        self.full = full
        self.floor = floor

    @property
    def enabled(self) -> bool:
        return self.start > 0

    def level(self, queue_depth: int) -> float:
        """0 below `start`, rising linearly to 1 at `full` (a step when start == full)."""
        if not self.enabled or queue_depth < self.start:
            return 0.0
        return min(1.0, (queue_depth - self.start + 1) / (self.full - self.start + 1))

    def apply(
        self,
        config: PruningConfig,
        visual_tokens: int,
        queue_depth: int,
        min_budget: int | float | None = None,
    ) -> tuple[PruningConfig, Degradation | None]:
        """The config a new request runs with at this queue depth, and what was changed (None = nothing).

        A method that keeps every token (`none`) is an explicit request for them and is never degraded. A budget is only ever
        lowered, never raised: when the floor is at or above what the request asked for, nothing changes.

        Args:
            config: The request's own config (its budget or the default budget already filled in).
            visual_tokens: Estimated unpruned visual tokens of its image (N).
            queue_depth: Requests waiting when it arrived (before it).
            min_budget: The request's floor: int = average tokens, float = keep ratio; None = the default floor.
        """
        level = self.level(queue_depth)
        if level <= 0.0 or not get_method(config.method).prunes or visual_tokens < 1:
            return config, None
        floor_budget: int | float = self.floor if min_budget is None else min_budget
        floor_ratio = _ratio_of(floor_budget, visual_tokens)
        requested_ratio = keep_ratio_of(config, visual_tokens)
        if floor_ratio >= requested_ratio:
            return config, None
        if level >= 1.0:
            applied: int | float = floor_budget
        else:
            target = requested_ratio - level * (requested_ratio - floor_ratio)
            if isinstance(config.budget, int):  # keep the request's unit: tokens stay tokens
                applied = max(math.ceil(floor_ratio * visual_tokens), round(target * visual_tokens), 1)
            else:
                applied = round(max(target, floor_ratio), 4)
        if _ratio_of(applied, visual_tokens) >= requested_ratio:
            return config, None
        degraded = PruningConfig(**{**config.model_dump(), "budget": applied})
        return degraded, Degradation(
            requested_budget=config.budget,
            applied_budget=degraded.budget if degraded.budget is not None else applied,
            floor_budget=floor_budget,
            queue_depth=queue_depth,
            level=round(level, 4),
        )


def _ratio_of(budget: int | float, visual_tokens: int) -> float:
    """A budget as a keep ratio of an image of `visual_tokens` (int = tokens, capped at all of them)."""
    if isinstance(budget, int):
        return min(budget, visual_tokens) / visual_tokens
    return float(budget)


__all__ = ["Admission", "Degradation", "DegradationPolicy", "Ticket"]

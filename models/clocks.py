"""Stage clocks for the engine's per-stage timings (vision, prune, prefill, decode).

Two clocks with one interface (`now`, `add`, `timings`):

* `StageClock` waits for the device at every reading (`torch.cuda.synchronize` on CUDA), so each stage's wall time
  means what it says. This is what serving uses: a response's `timing_ms` must be true per stage.
* `CudaEventClock` records CUDA events and reads them once at the end, so measuring adds no synchronisation
  between stages; the speed benchmark uses it on GPUs.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch


class Clock(Protocol):
    """What the engine needs from a clock: a reading now, and "stage ran from `since` until now"."""

    def now(self) -> Any: ...

    def add(self, stage: str, since: Any) -> Any: ...

    @property
    def timings(self) -> dict[str, float]: ...


class StageClock:
    """Wall-clock stage timer that waits for the GPU, so CUDA timings mean what they say."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._timings: dict[str, float] = {}

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per stage so far (stages measured several times are summed)."""
        return self._timings

    def now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, stage: str, since: float) -> float:
        current = self.now()
        self._timings[stage] = self._timings.get(stage, 0.0) + current - since
        return current


class CudaEventClock:
    """Records a CUDA event per reading and reads all spans once, at the end (no sync between stages)."""

    def __init__(self) -> None:
        self._spans: list[tuple[str, Any, Any]] = []

    def now(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, stage: str, since: Any) -> Any:
        current = self.now()
        self._spans.append((stage, since, current))
        return current

    @property
    def timings(self) -> dict[str, float]:
        torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for stage, start, end in self._spans:
            totals[stage] = totals.get(stage, 0.0) + start.elapsed_time(end) / 1000.0
        return totals


__all__ = ["Clock", "CudaEventClock", "StageClock"]

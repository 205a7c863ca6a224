"""Wait for a quiet machine before a measured run, and record how quiet it was.

The benchmark machine's two cores are shared with other jobs; a run that starts while they are busy measures
them as much as the server. `wait_for_quiet` polls the 1-minute load average until it is under a threshold (or
gives up after `max_wait_s` and says so in the record), and `LoadAverages` keeps the value before and after each
point, so every result JSON carries the conditions it was measured in. It waits before the FIRST measured point of
a run only: the points of one run follow each other at once (waiting before each would mean waiting out the
benchmark's own load between them, about a minute per point, while the shared machine drifts anyway).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def load_average() -> float:
    """The 1-minute load average (/proc/loadavg)."""
    return os.getloadavg()[0]


def wait_for_quiet(
    threshold: float = 1.0, poll_s: float = 30.0, max_wait_s: float = 2400.0
) -> dict[str, Any]:
    """Block until the 1-minute load average is below `threshold`; returns what was seen.

    Returns:
        {"load_before": value at the start of the run, "waited_s": seconds waited, "quiet": whether the
        threshold was reached (False = gave up after max_wait_s and ran anyway)}.
    """
    started = time.monotonic()
    while True:
        value = load_average()
        if value < threshold:
            return {
                "load_before": round(value, 2),
                "waited_s": round(time.monotonic() - started),
                "quiet": True,
            }
        if time.monotonic() - started >= max_wait_s:
            logger.warning("load average still %.2f after %.0f s; running anyway", value, max_wait_s)
            return {
                "load_before": round(value, 2),
                "waited_s": round(time.monotonic() - started),
                "quiet": False,
            }
        logger.info("load average %.2f >= %.2f; waiting %.0f s", value, threshold, poll_s)
        time.sleep(poll_s)


@dataclass
class LoadAverages:
    """Load averages around each named run of one benchmark."""

    threshold: float
    poll_s: float
    max_wait_s: float
    enabled: bool = True
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    gated: bool = False

    def before(self, name: str) -> None:
        """Note the load average at the start of point `name`; the first point waits for quiet (when enabled)."""
        if self.enabled and not self.gated:
            self.runs[name] = wait_for_quiet(self.threshold, self.poll_s, self.max_wait_s)
            self.gated = True
        else:
            self.runs[name] = {"load_before": round(load_average(), 2), "waited_s": 0, "quiet": None}

    def gate(self, name: str = "gate") -> None:
        """Wait for quiet now (once per run), e.g. before starting a server that polls while idle."""
        if self.enabled and not self.gated:
            self.runs[name] = wait_for_quiet(self.threshold, self.poll_s, self.max_wait_s)
            self.runs[name]["load_after"] = self.runs[name]["load_before"]
            self.gated = True

    def after(self, name: str) -> None:
        self.runs.setdefault(name, {})["load_after"] = round(load_average(), 2)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def add_quiet_arguments(parser: Any) -> None:
    """The --quiet-* options every benchmark here shares."""
    parser.add_argument("--quiet-threshold", type=float, default=1.0, help="1-min load average to wait for")
    parser.add_argument("--quiet-poll", type=float, default=30.0)
    parser.add_argument("--quiet-max-wait", type=float, default=2400.0)
    parser.add_argument("--no-quiet-wait", action="store_true", help="smoke runs: do not wait")


def loads_from(args: Any) -> LoadAverages:
    return LoadAverages(args.quiet_threshold, args.quiet_poll, args.quiet_max_wait, not args.no_quiet_wait)


def start_benchmark(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, LoadAverages]:
    """What every benchmark's `main` does first: add the --quiet-* options, parse `argv`, log at INFO with times
    (httpx's per-request lines off), and the load-average recorder the options describe."""
    add_quiet_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return args, loads_from(args)


def start_in_process_benchmark(
    parser: argparse.ArgumentParser, argv: list[str] | None, repeats: int
) -> tuple[argparse.Namespace, LoadAverages]:
    """`start_benchmark` for a benchmark that runs the model in its own process (no server), with the options
    they all take: --batch-sizes, --repeats, --threads (torch's, applied here) and --out."""
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, required=True)
    args, loads = start_benchmark(parser, argv)
    import torch  # here, not at the top: the server benchmarks import this module without torch

    torch.set_num_threads(args.threads)
    return args, loads


__all__ = [
    "LoadAverages",
    "add_quiet_arguments",
    "load_average",
    "loads_from",
    "start_benchmark",
    "start_in_process_benchmark",
    "wait_for_quiet",
]

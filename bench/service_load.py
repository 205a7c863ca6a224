"""Service load runs over loopback: capacity, 0.5x / 1x / 2x capacity, batching gain, load-adaptive degradation.

Every run starts a real `python -m service` (uvicorn + spawned worker) on 127.0.0.1 and loads `/ground` with
`bench.loadgen`. Clients ask for every visual token (no budget), the expensive request a degradation can cheapen.

1. capacity: closed loop at 2 x `max_batch_size` in flight -> C requests/s (keep-all requests).
2. open loop at 0.5 C, 1 C and 2 C on a server sized by the usual rule: deadline D, queue bound
   Q = round(D x C) requests (the queue holds what can be served within the deadline). At 2 C the checks are:
   no answer later than the deadline (+ a slack for the response to travel), every rejection 429 with Retry-After,
   every request answered (no client timeout, no connection error).
3. batching gain: `max_batch_size` 1, 8, 16; closed loop at several concurrencies; the best throughput whose p99
   stays within one latency budget.
4. degradation: the 1 C and 2 C runs again with `NUWA_DEGRADE_QUEUE_START` = Q/4, `NUWA_DEGRADE_QUEUE_FULL` = Q/2
   and floor 0.25, compared with run 2.

Usage: ``python -m bench.service_load --out bench/results/service_load.json`` (about 6-8 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult, closed_loop, open_loop, run, scene_payloads
from bench.server import default_model_dir, start_service
from tests.support.launcher import ServiceProcess

logger = logging.getLogger(__name__)

BASE_SETTINGS = {"max_new_tokens": "8", "max_wait_ms": "10", "retry_after_s": "1"}
DEADLINE_SLACK_S = 0.5
"""An answer may leave the server up to this long after its deadline passed (the 504 itself has to travel)."""


def _serve(model_dir: Path, log_dir: Path, name: str, **settings: str) -> ServiceProcess:
    service = start_service(model_dir, log_dir, name, **{**BASE_SETTINGS, **settings})
    service.wait_ready()
    return service


def _warm(service: ServiceProcess) -> None:
    """A few requests first, so the first measured ones do not pay for lazy imports and caches."""
    run(lambda: closed_loop(service.base_url, scene_payloads(4), 4, 10.0, 8, 60.0))


def measure_capacity(model_dir: Path, log_dir: Path, batch_size: int, duration_s: float) -> dict[str, Any]:
    service = _serve(
        model_dir,
        log_dir,
        "capacity",
        max_batch_size=str(batch_size),
        max_queue_requests="256",
        request_timeout_s="60",
    )
    try:
        _warm(service)
        result = run(
            lambda: closed_loop(
                service.base_url, scene_payloads(8), 2 * batch_size, duration_s, 2000, 90.0, label="capacity"
            )
        )
    finally:
        service.stop()
    return result.summary()


def overload_runs(
    model_dir: Path,
    log_dir: Path,
    capacity: float,
    batch_size: int,
    deadline_s: float,
    duration_s: float,
    factors: tuple[float, ...],
    degrade: bool,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Open-loop runs at `factors` x capacity on one server; returns the summaries and the server settings."""
    queue = max(batch_size, round(deadline_s * capacity))
    settings = {
        "max_batch_size": str(batch_size),
        "max_queue_requests": str(queue),
        "request_timeout_s": f"{deadline_s:g}",
    }
    if degrade:
        start = max(1, queue // 4)
        settings.update(
            degrade_queue_start=str(start),
            degrade_queue_full=str(max(start, queue // 2)),
            degrade_floor="0.25",
        )
    name = "degrade" if degrade else "plain"
    service = _serve(model_dir, log_dir, name, **settings)
    summaries = []
    try:
        _warm(service)
        for index, factor in enumerate(factors):
            rate = factor * capacity
            result: LoadResult = asyncio.run(
                open_loop(
                    service.base_url,
                    scene_payloads(8),
                    rate,
                    duration_s,
                    int(rate * duration_s * 2) + 10,
                    deadline_s + 30.0,
                    seed=index,
                    label=f"{name} {factor:g}x",
                )
            )
            summary = result.summary(deadline_s + DEADLINE_SLACK_S)
            summary.update(factor=factor, degrade=degrade, queue_bound=queue, deadline_s=deadline_s)
            summary["latency_trace"] = [
                [round(r.sent_s, 3), round(r.latency_s * 1000, 1), r.status] for r in result.records
            ]
            summaries.append(summary)
            logger.info("%s", {k: v for k, v in summary.items() if k != "latency_trace"})
            time.sleep(deadline_s + 1.0)  # let the queue empty before the next rate
    finally:
        code = service.stop()
    settings["exit_code"] = str(code)
    return summaries, settings


def batching_gain(
    model_dir: Path,
    log_dir: Path,
    batch_sizes: tuple[int, ...],
    concurrencies: tuple[int, ...],
    duration_s: float,
    p99_budget_ms: float,
) -> list[dict[str, Any]]:
    """For each max_batch_size: closed-loop throughput and p99 at each concurrency; best within the p99 budget."""
    out = []
    for batch_size in batch_sizes:
        service = _serve(
            model_dir,
            log_dir,
            f"batch{batch_size}",
            max_batch_size=str(batch_size),
            max_queue_requests="256",
            request_timeout_s="60",
        )
        points = []
        try:
            _warm(service)
            for concurrency in concurrencies:
                result = asyncio.run(
                    closed_loop(
                        service.base_url,
                        scene_payloads(8),
                        concurrency,
                        duration_s,
                        2000,
                        90.0,
                        label=f"b{batch_size} c{concurrency}",
                    )
                )
                summary = result.summary()
                points.append(
                    {
                        "concurrency": concurrency,
                        "throughput_rps": summary["throughput_rps"],
                        "p50_ms": summary["p50_ms"],
                        "p99_ms": summary["p99_ms"],
                        "mean_batch_size": summary["mean_batch_size"],
                        "statuses": summary["statuses"],
                    }
                )
                logger.info("batch %d: %s", batch_size, points[-1])
        finally:
            service.stop()
        within = [p for p in points if p["p99_ms"] is not None and p["p99_ms"] <= p99_budget_ms]
        best = max(within, key=lambda p: p["throughput_rps"]) if within else None
        out.append({"max_batch_size": batch_size, "points": points, "best_within_budget": best})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load and overload a local nuwa-serve (loopback only).")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: built-in)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--deadline", type=float, default=4.0, help="NUWA_REQUEST_TIMEOUT_S of the overload runs"
    )
    parser.add_argument("--capacity-duration", type=float, default=15.0)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per open-loop rate")
    parser.add_argument("--batching-duration", type=float, default=8.0, help="seconds per concurrency")
    parser.add_argument("--p99-budget-ms", type=float, default=2000.0)
    parser.add_argument("--skip-batching", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model_dir = args.model or default_model_dir()
    log_dir = Path(tempfile.mkdtemp(prefix="nuwa-bench-logs-"))
    started = time.monotonic()
    capacity = measure_capacity(model_dir, log_dir, args.batch_size, args.capacity_duration)
    rate = float(capacity["throughput_rps"])
    logger.info("capacity: %.2f requests/s (%s)", rate, capacity)
    plain, plain_settings = overload_runs(
        model_dir,
        log_dir,
        rate,
        args.batch_size,
        args.deadline,
        args.duration,
        (0.5, 1.0, 2.0),
        degrade=False,
    )
    degraded, degrade_settings = overload_runs(
        model_dir, log_dir, rate, args.batch_size, args.deadline, args.duration, (1.0, 2.0), degrade=True
    )
    batching = (
        []
        if args.skip_batching
        else batching_gain(
            model_dir, log_dir, (1, 8, 16), (1, 4, 8, 16, 32), args.batching_duration, args.p99_budget_ms
        )
    )
    result = {
        "model_dir": str(model_dir),
        "machine": "2-core CPU, no GPU (shared with other work); server worker 1 torch thread",
        "capacity": capacity,
        "deadline_s": args.deadline,
        "deadline_slack_s": DEADLINE_SLACK_S,
        "plain_settings": plain_settings,
        "degrade_settings": degrade_settings,
        "overload": plain,
        "degradation": degraded,
        "batching": batching,
        "p99_budget_ms": args.p99_budget_ms,
        "wall_s": time.monotonic() - started,
        "logs": str(log_dir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    logger.info("wrote %s in %.0f s", args.out, result["wall_s"])


if __name__ == "__main__":
    main()

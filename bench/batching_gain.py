"""Batching gain at the same p99 budget (NUWA_MAX_BATCH_SIZE 1 / 8 / 16) and pipelining (NUWA_PIPELINE_DEPTH 1 / 2).

One server per setting value, ALL up at once for the whole run (an idle nuwa-serve costs about 0.2% of a core), and
the points interleaved: for each concurrency, every server in turn, the order rotated from one concurrency to the
next, so slow drift of the shared machine spreads over all settings instead of landing on one. Closed loop
(`bench.loadgen.closed_loop`), a fixed number of requests per point, every request its own image (no cache hits),
clients ask for every visual token (method none), the rest at the defaults (max wait 10 ms, cache on).

- `--sweep batch_size`: max_batch_size 1, 8, 16 at concurrency 1, 4, 8, 16, 32; per setting the best throughput
  whose p99 stays within `--p99-budget-ms` (the same budget for all).
- `--sweep pipeline_depth`: pipeline_depth 1 and 2 (max batch 8) at concurrency 4, 8, 16: throughput, p50, p99.
- `--sweep follow_ups`: `hold_for_follow_ups` off and on (max batch 8), the same points.

Usage:
    python -m bench.batching_gain --sweep batch_size --out bench/results/batching_gain.json
    python -m bench.batching_gain --sweep pipeline_depth --out bench/results/pipeline_gain.json
    python -m bench.batching_gain --sweep follow_ups --out bench/results/follow_ups.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loadgen import closed_loop, run
from bench.payloads import SeedBlock, distinct_scenes
from bench.quiet import start_benchmark
from bench.server import default_model_dir, start_service
from tests.support.launcher import ServiceProcess

logger = logging.getLogger(__name__)

SWEEPS: dict[str, dict[str, Any]] = {
    "batch_size": {"setting": "max_batch_size", "values": (1, 8, 16), "concurrency": (1, 4, 8, 16, 32)},
    "pipeline_depth": {"setting": "pipeline_depth", "values": (1, 2), "concurrency": (4, 8, 16)},
    "follow_ups": {"setting": "hold_for_follow_ups", "values": ("false", "true"), "concurrency": (4, 8, 16)},
}
FIELDS = {"method": "none"}


def requests_at(concurrency: int, scale: float) -> int:
    return max(2 * concurrency, round({1: 40, 4: 80, 8: 120}.get(concurrency, 10 * concurrency) * scale))


def point_of(url: str, payloads: list[Any], concurrency: int, label: str) -> dict[str, Any]:
    result = run(lambda: closed_loop(url, payloads, concurrency, 600.0, len(payloads), 120.0, label=label))
    summary = result.summary()
    waits = [r.timing_ms["wait"] for r in result.records if r.timing_ms]
    queues = [r.timing_ms["queue"] for r in result.records if r.timing_ms]
    return {
        "concurrency": concurrency,
        "requests": summary["requests"],
        "throughput_rps": summary["throughput_rps"],
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "mean_batch_size": summary["mean_batch_size"],
        "cache_hits": summary["cache_hits"],
        "mean_queue_ms": round(statistics.fmean(queues), 2) if queues else None,
        "mean_wait_ms": round(statistics.fmean(waits), 2) if waits else None,
        "statuses": summary["statuses"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Batching / pipelining gain on local nuwa-serve servers.")
    parser.add_argument("--sweep", choices=tuple(SWEEPS), required=True)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument("--scale", type=float, default=1.0, help="x the requests per point (smoke: 0.1)")
    parser.add_argument("--p99-budget-ms", type=float, default=2000.0)
    parser.add_argument("--max-new-tokens", default="8")
    parser.add_argument("--out", type=Path, required=True)
    args, loads = start_benchmark(parser, argv)
    sweep = SWEEPS[args.sweep]
    setting, values = sweep["setting"], sweep["values"]
    concurrencies = tuple(args.concurrency or sweep["concurrency"])
    model_dir = args.model or default_model_dir()
    log_dir = Path(tempfile.mkdtemp(prefix=f"nuwa-bench-{args.sweep}-"))
    seeds = SeedBlock(next_seed=20_000)
    started = time.monotonic()

    warmups = {value: distinct_scenes(seeds.take(16), 16, FIELDS) for value in values}
    loads_of = {
        (value, c): distinct_scenes(
            seeds.take(requests_at(c, args.scale)), requests_at(c, args.scale), FIELDS
        )
        for c in concurrencies
        for value in values
    }
    logger.info("rendered %d images", seeds.next_seed - 20_000)

    servers: dict[int, ServiceProcess] = {}
    points: dict[int, list[dict[str, Any]]] = {value: [] for value in values}
    try:
        for value in values:
            servers[value] = start_service(
                model_dir,
                log_dir,
                f"{setting}{value}",
                max_new_tokens=args.max_new_tokens,
                max_queue_requests="256",
                **{setting: str(value)},
            )
        for value, server in servers.items():
            server.wait_ready()
            run(lambda s=server, v=value: closed_loop(s.base_url, warmups[v], 4, 120.0, 16, 120.0))
        for turn, concurrency in enumerate(concurrencies):
            order = values[turn % len(values) :] + values[: turn % len(values)]
            for value in order:
                key = f"{setting}={value}:c{concurrency}"
                loads.before(key)
                point = point_of(servers[value].base_url, loads_of[(value, concurrency)], concurrency, key)
                loads.after(key)
                point["load"] = loads.runs[key]
                points[value].append(point)
                logger.info("%s: %s", key, point)
    finally:
        exit_codes = {value: server.stop() for value, server in servers.items()}

    results = []
    for value in values:
        series = sorted(points[value], key=lambda p: p["concurrency"])
        within = [p for p in series if p["p99_ms"] is not None and p["p99_ms"] <= args.p99_budget_ms]
        best = max(within, key=lambda p: p["throughput_rps"]) if within else None
        results.append({setting: value, "points": series, "best_within_budget": best})
    out = {
        "model_dir": str(model_dir),
        "machine": "2-core CPU shared with other work, no GPU; worker 1 torch thread",
        "sweep": args.sweep,
        "setting": setting,
        "p99_budget_ms": args.p99_budget_ms,
        "request_fields": FIELDS,
        "max_new_tokens": args.max_new_tokens,
        "results": results,
        "load_average": loads.to_json(),
        "exit_codes": exit_codes,
        "wall_s": round(time.monotonic() - started, 1),
        "logs": str(log_dir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

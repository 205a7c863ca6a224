"""Fault runs over loopback: kill the worker mid-load (twice), and SIGTERM the server mid-load.

1. Worker kills: open-loop load at ~0.7x capacity for `--duration` s; the worker process is SIGKILLed at 1/4 and
   again at 2/3 of the run. Reported: answers by status and error code, requests without any answer (must be 0),
   and for each kill the time until /readyz is 200 again (new worker spawned, model loaded, warm-up forward).
2. SIGTERM: open-loop load at ~1.5x capacity; SIGTERM to the server at 40% of the run. Reported: what the
   requests sent before the signal got (admitted ones must finish: 200, or 429 if refused at admission), what the
   ones sent after got (503 `shutting_down` while draining, connection refused once the process is gone), the
   drain time and the exit code (must be 0).

Usage: ``python -m bench.fault_run --out bench/results/fault_run.json`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import LoadResult, Record, closed_loop, open_loop, run, scene_payloads
from bench.server import default_model_dir, start_service
from tests.support.launcher import ServiceProcess

logger = logging.getLogger(__name__)

SETTINGS = {
    "max_new_tokens": "8",
    "max_wait_ms": "10",
    "max_batch_size": "8",
    "max_queue_requests": "64",
    "request_timeout_s": "15",
    "retry_after_s": "1",
    "drain_timeout_s": "30",
}


def _mix(records: list[Record]) -> dict[str, Any]:
    return {
        "requests": len(records),
        "statuses": dict(sorted(Counter(str(r.status) for r in records).items())),
        "error_codes": dict(sorted(Counter(r.error_code for r in records if r.error_code).items())),
        "failures": dict(sorted(Counter(r.failure for r in records if r.failure).items())),
    }


async def _wait_readiness(url: str, ready: bool, since: float, timeout_s: float) -> float | None:
    """Seconds from `since` until /readyz is 200 (`ready`) or not 200 (not `ready`); None on timeout."""
    async with httpx.AsyncClient(base_url=url, timeout=2.0) as client:
        while time.monotonic() - since < timeout_s:
            try:
                if ((await client.get("/readyz")).status_code == 200) == ready:
                    return time.monotonic() - since
            except httpx.TransportError:
                if not ready:
                    return time.monotonic() - since
            await asyncio.sleep(0.01)
    return None


def capacity_of(service: ServiceProcess) -> float:
    result = run(lambda: closed_loop(service.base_url, scene_payloads(8), 16, 10.0, 1000, 60.0))
    return float(result.summary()["throughput_rps"])


def _start_load(
    base_url: str, rate: float, duration_s: float, seed: int, label: str
) -> asyncio.Task[LoadResult]:
    """Open-loop scene requests at `rate` for `duration_s`, as a task, so the scenario can act while it runs."""
    return asyncio.create_task(
        open_loop(
            base_url,
            scene_payloads(8),
            rate,
            duration_s,
            int(rate * duration_s * 2) + 10,
            45.0,
            seed=seed,
            label=label,
        )
    )


def worker_kills(model_dir: Path, log_dir: Path, duration_s: float) -> dict[str, Any]:
    service = start_service(model_dir, log_dir, "kills", **SETTINGS)
    service.wait_ready()
    kills: list[dict[str, Any]] = []
    try:
        capacity = capacity_of(service)
        rate = 0.7 * capacity

        async def scenario() -> LoadResult:
            load = _start_load(service.base_url, rate, duration_s, seed=7, label="worker kills")
            started = time.monotonic()
            for at in (duration_s / 4, duration_s * 2 / 3):
                await asyncio.sleep(max(0.0, started + at - time.monotonic()))
                async with httpx.AsyncClient(base_url=service.base_url, timeout=5.0) as client:
                    pid = int((await client.get("/healthz")).json()["worker"]["pid"])
                killed = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                noticed = await _wait_readiness(service.base_url, False, killed, 10.0)
                back = await _wait_readiness(service.base_url, True, killed, 120.0)
                kills.append(
                    {
                        "at_s": round(killed - started, 3),
                        "pid": pid,
                        "unready_after_s": noticed,
                        "ready_again_after_s": back,
                    }
                )
                logger.info(
                    "killed worker %d; unready after %s s, ready again after %s s", pid, noticed, back
                )
            return await load

        result = asyncio.run(scenario())
        async_health = httpx.get(f"{service.base_url}/healthz", timeout=5.0).json()
    finally:
        code = service.stop()
    records = result.records
    return {
        "capacity_rps": capacity,
        "rate_rps": rate,
        "duration_s": duration_s,
        "kills": kills,
        "answers": _mix(records),
        "no_response": sum(1 for r in records if r.status == 0),
        "retry_after_on_every_503": all(r.retry_after for r in records if r.status == 503),
        "restarts_reported": async_health["worker"]["restarts"],
        "exit_code": code,
        "trace": [[round(r.sent_s, 3), round(r.latency_s * 1000, 1), r.status] for r in records],
    }


def sigterm_during_load(model_dir: Path, log_dir: Path, duration_s: float) -> dict[str, Any]:
    service = start_service(model_dir, log_dir, "sigterm", **SETTINGS)
    service.wait_ready()
    capacity = capacity_of(service)
    rate = 1.5 * capacity
    signal_at = 0.4 * duration_s
    marks: dict[str, float] = {}

    async def scenario() -> LoadResult:
        load = _start_load(service.base_url, rate, duration_s, seed=11, label="sigterm")
        started = time.monotonic()
        await asyncio.sleep(signal_at)
        marks["signal_s"] = time.monotonic() - started
        service.process.send_signal(signal.SIGTERM)
        while service.process.poll() is None and time.monotonic() - started < duration_s + 60:
            await asyncio.sleep(0.02)
        marks["exit_s"] = time.monotonic() - started
        return await load

    try:
        result = asyncio.run(scenario())
    finally:
        code = service.stop()
    records = result.records
    before = [r for r in records if r.sent_s < marks["signal_s"]]
    after = [r for r in records if r.sent_s >= marks["signal_s"]]
    return {
        "capacity_rps": capacity,
        "rate_rps": rate,
        "duration_s": duration_s,
        "signal_at_s": round(marks["signal_s"], 3),
        "drain_s": round(marks["exit_s"] - marks["signal_s"], 3),
        "exit_code": code,
        "sent_before_signal": _mix(before),
        "sent_after_signal": _mix(after),
        "before_signal_all_answered_200_or_429": all(r.status in (200, 429) for r in before),
        "after_signal_only_503_or_refused": all(
            r.status == 503 or (r.status == 0 and r.failure == "ConnectError") for r in after
        ),
        "trace": [[round(r.sent_s, 3), round(r.latency_s * 1000, 1), r.status] for r in records],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Kill the worker / SIGTERM the server under load (loopback)."
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load in the kill run")
    parser.add_argument("--sigterm-duration", type=float, default=12.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model_dir = args.model or default_model_dir()
    log_dir = Path(tempfile.mkdtemp(prefix="nuwa-fault-logs-"))
    started = time.monotonic()
    result = {
        "model_dir": str(model_dir),
        "machine": "2-core CPU, no GPU (shared with other work); server worker 1 torch thread",
        "settings": SETTINGS,
        "worker_kills": worker_kills(model_dir, log_dir, args.duration),
        "sigterm": sigterm_during_load(model_dir, log_dir, args.sigterm_duration),
        "logs": str(log_dir),
    }
    result["wall_s"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result["worker_kills"].items() if k != "trace"}
    logger.info("worker kills: %s", summary)
    logger.info("sigterm: %s", {k: v for k, v in result["sigterm"].items() if k != "trace"})


if __name__ == "__main__":
    main()

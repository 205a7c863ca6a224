"""HTTP load generator (httpx async): open loop at a target rate, or closed loop at a fixed concurrency.

Open loop sends on a Poisson schedule whatever the server does, which is how overload really arrives (a closed
loop slows down with the server and hides queueing). Closed loop keeps `concurrency` requests in flight and
measures capacity. Both are bounded by a request count AND a duration, and every request has a client timeout
above the server deadline, so a request that would hang is recorded as such (status 0) instead of blocking the
run. Only loopback targets are accepted: this tool never sends traffic off the machine.

Usage: ``python -m bench.loadgen --url http://127.0.0.1:8000 --mode open --rate 4 --duration 20``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import logging
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

HARD_MAX_REQUESTS = 20_000
HARD_MAX_DURATION_S = 900.0


def check_loopback(url: str) -> None:
    """Refuse any target that is not on this machine (127.0.0.0/8, ::1, localhost)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"load target {url!r} is not a loopback address; this tool only loads local servers")


@dataclass(frozen=True)
class Payload:
    """One /ground request body (multipart) and its headers."""

    image: bytes
    phrase: str
    fields: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def scene_payloads(
    count: int = 8,
    budget: str | None = None,
    min_budget: str | None = None,
    timeout_s: float | None = None,
    api_key: str | None = None,
) -> list[Payload]:
    """`count` distinct contract scenes (336 px PNG) with their phrases, as /ground requests."""
    from models.builtin.scenes import make_grounding_item, render

    payloads = []
    for seed in range(count):
        item = make_grounding_item(random.Random(seed), 336)
        buffer = io.BytesIO()
        render(item.scene).save(buffer, format="PNG")
        fields = {}
        if budget is not None:
            fields["budget"] = budget
        if min_budget is not None:
            fields["min_budget"] = min_budget
        headers = {}
        if timeout_s is not None:
            headers["X-Request-Timeout"] = f"{timeout_s:g}"
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        payloads.append(Payload(buffer.getvalue(), item.phrase, fields, headers))
    return payloads


@dataclass
class Record:
    """One request as the client saw it.

    Attributes:
        sent_s: Send time relative to the start of the run.
        latency_s: Send to full response (or to the client timeout / transport error).
        status: HTTP status; 0 = no response (client timeout or connection error).
        error_code: `error.code` of an error body.
        retry_after: The Retry-After header, if any.
        degraded: The response carried a non-null `degradation`.
        applied_budget: `visual_tokens.budget` of a 200.
        stage1_tokens: `visual_tokens.stage1` of a 200.
        batch_size: `batch_size` of a 200.
        failure: Exception name when there was no response.
        cache: `cache` of a 200 ("hit" / "miss"; None when the server does not say).
        timing_ms: `timing_ms` of a 200 (the server's per-stage breakdown; None when absent).
    """

    sent_s: float
    latency_s: float
    status: int
    error_code: str | None = None
    retry_after: str | None = None
    degraded: bool = False
    applied_budget: float | None = None
    stage1_tokens: int | None = None
    batch_size: int | None = None
    failure: str | None = None
    cache: str | None = None
    timing_ms: dict[str, float] | None = None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """p50 / p99 / mean of every column of `rows` (3 decimals): the summary every sequential benchmark reports."""
    out: dict[str, dict[str, float | None]] = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        out[key] = {
            "p50": _r(percentile(values, 50)),
            "p99": _r(percentile(values, 99)),
            "mean": _r(statistics.fmean(values)),
        }
    return out


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class LoadResult:
    """All records of one run plus what was asked for."""

    mode: Literal["open", "closed"]
    target: float  # requests/s (open) or concurrency (closed)
    wall_s: float
    records: list[Record]
    label: str = ""

    def summary(self, deadline_s: float | None = None) -> dict[str, Any]:
        """Throughput, latency percentiles (ms) of 200s and of every answer, status mix and the overload checks."""
        ok = [r.latency_s * 1000 for r in self.records if r.status == 200]
        answered = [r.latency_s * 1000 for r in self.records if r.status != 0]
        statuses = Counter(str(r.status) for r in self.records)
        codes = Counter(r.error_code for r in self.records if r.error_code)
        rejected = [r for r in self.records if r.status == 429]
        sent_window = max((r.sent_s for r in self.records), default=0.0)
        summary: dict[str, Any] = {
            "label": self.label,
            "mode": self.mode,
            "target": self.target,
            "requests": len(self.records),
            "wall_s": round(self.wall_s, 3),
            "offered_rps": round(len(self.records) / sent_window, 3) if sent_window > 0 else None,
            "throughput_rps": round(len(ok) / self.wall_s, 3) if self.wall_s > 0 else 0.0,
            "statuses": dict(sorted(statuses.items())),
            "error_codes": dict(sorted(codes.items())),
            "p50_ms": _round(percentile(ok, 50)),
            "p95_ms": _round(percentile(ok, 95)),
            "p99_ms": _round(percentile(ok, 99)),
            "max_ms": _round(max(ok, default=None)),
            "mean_ms": _round(statistics.fmean(ok) if ok else None),
            "answered_p99_ms": _round(percentile(answered, 99)),
            "answered_max_ms": _round(max(answered, default=None)),
            "no_response": statuses.get("0", 0),
            "rejections_all_429_with_retry_after": all(r.retry_after for r in rejected),
            "degraded": sum(r.degraded for r in self.records),
            "mean_stage1_tokens": _round(
                statistics.fmean([r.stage1_tokens for r in self.records if r.stage1_tokens is not None])
                if any(r.stage1_tokens is not None for r in self.records)
                else None
            ),
            "cache_hits": sum(r.cache == "hit" for r in self.records),
            "mean_batch_size": _round(
                statistics.fmean([r.batch_size for r in self.records if r.batch_size is not None])
                if any(r.batch_size is not None for r in self.records)
                else None
            ),
        }
        if deadline_s is not None:
            limit_ms = deadline_s * 1000
            summary["deadline_ms"] = limit_ms
            summary["answers_past_deadline"] = sum(1 for value in answered if value > limit_ms)
        return summary

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "target": self.target,
            "wall_s": self.wall_s,
            "label": self.label,
            "records": [asdict(r) for r in self.records],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def _send(client: httpx.AsyncClient, payload: Payload, started: float, timeout_s: float) -> Record:
    sent = time.monotonic()
    try:
        response = await client.post(
            "/ground",
            files={"image": ("scene.png", payload.image, "image/png")},
            data={"phrase": payload.phrase, **payload.fields},
            headers=payload.headers,
            timeout=timeout_s,
        )
    except (httpx.TimeoutException, httpx.TransportError) as exc:
        return Record(sent - started, time.monotonic() - sent, 0, failure=type(exc).__name__)
    latency = time.monotonic() - sent
    record = Record(sent - started, latency, response.status_code)
    record.retry_after = response.headers.get("retry-after")
    try:
        body = response.json()
    except ValueError:
        return record
    if response.status_code == 200:
        tokens = body.get("visual_tokens", {})
        record.degraded = body.get("degradation") is not None
        budget = tokens.get("budget")
        record.applied_budget = float(budget) if isinstance(budget, int | float) else None
        record.stage1_tokens = tokens.get("stage1")
        record.batch_size = body.get("batch_size")
        record.cache = body.get("cache")
        timing = body.get("timing_ms")
        record.timing_ms = timing if isinstance(timing, dict) else None
    elif isinstance(body, dict) and isinstance(body.get("error"), dict):
        record.error_code = body["error"].get("code")
    return record


def _client(url: str) -> httpx.AsyncClient:
    check_loopback(url)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    return httpx.AsyncClient(base_url=url, limits=limits)


async def open_loop(
    url: str,
    payloads: list[Payload],
    rate: float,
    duration_s: float,
    max_requests: int,
    client_timeout_s: float,
    seed: int = 0,
    label: str = "",
) -> LoadResult:
    """Send at `rate` requests/s (Poisson arrivals) for `duration_s` or `max_requests`, whichever is first.

    Args:
        url: Base URL of a loopback server.
        payloads: Request bodies, used round-robin.
        rate: Mean arrival rate (requests/s).
        duration_s: Longest sending window.
        max_requests: Most requests sent.
        client_timeout_s: Per-request client timeout (set above the server deadline: a request that reaches
            it is counted as hung, status 0).
        seed: Seed of the arrival schedule.
        label: Name of the run in the summary.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    duration_s = min(duration_s, HARD_MAX_DURATION_S)
    max_requests = min(max_requests, HARD_MAX_REQUESTS)
    rng = random.Random(seed)
    async with _client(url) as client:
        started = time.monotonic()
        tasks: list[asyncio.Task[Record]] = []
        next_at = 0.0
        while len(tasks) < max_requests and next_at < duration_s:
            delay = started + next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            payload = payloads[len(tasks) % len(payloads)]
            tasks.append(asyncio.create_task(_send(client, payload, started, client_timeout_s)))
            next_at += rng.expovariate(rate)
        records = list(await asyncio.gather(*tasks))
        wall = time.monotonic() - started
    return LoadResult("open", rate, wall, records, label)


async def closed_loop(
    url: str,
    payloads: list[Payload],
    concurrency: int,
    duration_s: float,
    max_requests: int,
    client_timeout_s: float,
    label: str = "",
) -> LoadResult:
    """Keep `concurrency` requests in flight until `max_requests` were sent or `duration_s` passed."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    duration_s = min(duration_s, HARD_MAX_DURATION_S)
    max_requests = min(max_requests, HARD_MAX_REQUESTS)
    records: list[Record] = []
    sent = 0
    async with _client(url) as client:
        started = time.monotonic()

        async def user() -> None:
            nonlocal sent
            while sent < max_requests and time.monotonic() - started < duration_s:
                payload = payloads[sent % len(payloads)]
                sent += 1
                records.append(await _send(client, payload, started, client_timeout_s))

        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.monotonic() - started
    records.sort(key=lambda r: r.sent_s)
    return LoadResult("closed", float(concurrency), wall, records, label)


def run(coro_factory: Callable[[], Any]) -> Any:
    """Run one load coroutine to completion on a fresh event loop."""
    return asyncio.run(coro_factory())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load a LOCAL nuwa-serve /ground endpoint.")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--mode", choices=("open", "closed"), default="open")
    parser.add_argument("--rate", type=float, default=2.0, help="open loop: requests/s")
    parser.add_argument("--concurrency", type=int, default=8, help="closed loop: requests in flight")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds (bounded at 900)")
    parser.add_argument("--max-requests", type=int, default=500)
    parser.add_argument("--budget", default=None)
    parser.add_argument("--min-budget", default=None)
    parser.add_argument("--deadline", type=float, default=None, help="X-Request-Timeout seconds")
    parser.add_argument("--client-timeout", type=float, default=90.0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write every record as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    payloads = scene_payloads(8, args.budget, args.min_budget, args.deadline, args.api_key)
    if args.mode == "open":
        result = run(
            lambda: open_loop(
                args.url, payloads, args.rate, args.duration, args.max_requests, args.client_timeout
            )
        )
    else:
        result = run(
            lambda: closed_loop(
                args.url, payloads, args.concurrency, args.duration, args.max_requests, args.client_timeout
            )
        )
    print(json.dumps(result.summary(args.deadline), indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result.to_json()))


if __name__ == "__main__":
    main()

"""Where a lone request's time goes, hop by hop: client, API process, pipe, worker, and back.

A real `python -m service` on loopback with `NUWA_TRACE_SPANS_FILE` set (see `service/spans.py` for the points),
one request at a time (200 by default), each with its own 336 px PNG (no cache hit). The client stamps its send
and its full response with `time.monotonic` (CLOCK_MONOTONIC, the clock of the server's points), so every hop is
a difference of two readings of one clock:

    HTTP in            client send        -> arrived     (loopback, uvicorn, the ASGI layers)
    API: read, admit   arrived            -> queued      (body, multipart, checks, header probe, admission)
    API: dispatch      queued             -> dispatched  (the dispatch loop's turn)
    pipe out           dispatched         -> received
    worker: decode     received           -> decoded     (image decode, content hash)
    worker: prepare    decoded            -> running     (the processor: the `preprocess` stage, and `wait`)
    worker: model      running            -> done        (vision ... decode, and what the runner does around them)
    pipe back          done               -> delivered
    API: answer        delivered          -> responding  (the route resumes, the response is built)
    HTTP out           responding         -> client end  (the response through the ASGI layers and loopback)

The model's own stages of `timing_ms` (preprocess + wait + vision + prune + prefill + decode) sit inside
"prepare" and "model"; the table gives both, and the request-path overhead as `bench.request_overhead` defines it.

Usage: ``python -m bench.request_spans --out bench/results/request_spans.json``
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import check_loopback, summarise
from bench.payloads import SeedBlock, scene_png
from bench.quiet import start_benchmark
from bench.request_overhead import MODEL_STAGES
from bench.server import default_model_dir, start_service

logger = logging.getLogger(__name__)

HOPS = (
    ("HTTP in", "sent", "arrived"),
    ("API: read, admit", "arrived", "queued"),
    ("API: dispatch", "queued", "dispatched"),
    ("pipe out", "dispatched", "received"),
    ("worker: decode", "received", "decoded"),
    ("worker: prepare", "decoded", "running"),
    ("worker: model", "running", "done"),
    ("pipe back", "done", "delivered"),
    ("API: answer", "delivered", "responding"),
    ("HTTP out", "responding", "answered"),
)


def read_points(path: Path) -> dict[str, dict[str, float]]:
    """`{request id: {point: seconds}}` from the spans file (the first reading of a point wins)."""
    points: dict[str, dict[str, float]] = defaultdict(dict)
    for line in path.read_text(encoding="utf-8").splitlines():
        request_id, point, seconds = line.split()
        points[request_id].setdefault(point, float(seconds))
    return points


def hop_rows(
    points: dict[str, dict[str, float]], client: dict[str, dict[str, Any]]
) -> list[dict[str, float]]:
    """Per request: every hop (ms), the client latency, the model stages and the overhead."""
    rows = []
    for request_id, seen in client.items():
        stamps = {**points.get(request_id, {}), "sent": seen["sent"], "answered": seen["answered"]}
        if any(start not in stamps or end not in stamps for _, start, end in HOPS):
            continue
        row = {name: (stamps[end] - stamps[start]) * 1000 for name, start, end in HOPS}
        row["client"] = (seen["answered"] - seen["sent"]) * 1000
        row["model stages"] = sum(seen["timing_ms"][stage] for stage in MODEL_STAGES)
        row["overhead"] = row["client"] - row["model stages"]
        row["image_decode"] = seen["timing_ms"]["image_decode"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Per-hop timestamps of sequential requests on a local nuwa-serve."
    )
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: built-in)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args, loads = start_benchmark(parser, argv)
    model_dir = args.model or default_model_dir()
    seeds = SeedBlock()
    first = seeds.take(args.warmup + args.requests)
    bodies = [scene_png(seed)[:2] for seed in range(first, first + args.warmup + args.requests)]
    log_dir = Path(tempfile.mkdtemp(prefix="nuwa-bench-spans-"))
    spans_file = log_dir / "spans.txt"
    service = start_service(model_dir, log_dir, "spans", max_new_tokens="8", trace_spans_file=str(spans_file))
    client_points: dict[str, dict[str, Any]] = {}
    try:
        service.wait_ready()
        check_loopback(service.base_url)
        loads.before("png_336")
        with httpx.Client(base_url=service.base_url, timeout=120.0) as client:
            for index, (data, phrase) in enumerate(bodies):
                request_id = f"spans-{index:05d}"
                sent = time.monotonic()
                response = client.post(
                    "/ground",
                    files={"image": ("scene.png", data, "image/png")},
                    data={"phrase": phrase},
                    headers={"X-Request-Id": request_id},
                )
                answered = time.monotonic()
                if response.status_code != 200:
                    raise RuntimeError(f"/ground answered {response.status_code}: {response.text[:300]}")
                if index >= args.warmup:
                    timing = response.json()["timing_ms"]
                    client_points[request_id] = {"sent": sent, "answered": answered, "timing_ms": timing}
        loads.after("png_336")
    finally:
        code = service.stop()
    rows = hop_rows(read_points(spans_file), client_points)
    summary = summarise(rows)
    out = {
        "model_dir": str(model_dir),
        "machine": f"{platform.processor() or platform.machine()}, 2 shared cores, no GPU; worker 1 torch thread",
        "requests": len(rows),
        "hops": [{"name": name, "from": start, "to": end} for name, start, end in HOPS],
        "ms": summary,
        "load_average": loads.to_json(),
        "exit_code": code,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    logger.info("%s", {name: values["p50"] for name, values in summary.items()})
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

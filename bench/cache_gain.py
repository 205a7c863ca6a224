"""Image-embedding cache gain: the same image with 8 different phrases, cache on vs off, in one run.

Two servers, both up for the whole run and measured interleaved (mode by mode, the order of the two alternated):
NUWA_EMBED_CACHE_MB default (256) and 0 (disabled). On each, three ways to ask 8
phrases about one image (every image has 8 distinct valid phrases; images are distinct across modes and servers):
- `sequential`: 8 separate /ground requests, one at a time (cache on: 1 miss + 7 hits per image);
- `concurrent`: 8 separate requests in flight (closed loop, concurrency 8; phrases of one image often share a
  batch, where the vision tower runs once per image even without the cache);
- `one_request`: one /ground with the 8 phrases (repeated `phrase` field): vision once, the phrases as one batch.
Reported per mode: phrases answered per second, mean `timing_ms.vision` per request, cache hits, p50/p99.

Usage: ``python -m bench.cache_gain --out bench/results/cache_gain.json``
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

import httpx

from bench.loadgen import Payload, check_loopback, closed_loop, percentile, run
from bench.payloads import scene_png
from bench.quiet import start_benchmark
from bench.server import default_model_dir, start_service

logger = logging.getLogger(__name__)

PHRASES_PER_IMAGE = 8
SETTINGS = {"cache on (256 MB)": {}, "cache off (0)": {"embed_cache_mb": "0"}}


def images_with_phrases(count: int, first_seed: int) -> tuple[list[tuple[bytes, list[str]]], int]:
    """`count` scenes with at least 8 distinct phrases each (seeds from `first_seed`); returns them and the next
    unused seed."""
    out = []
    seed = first_seed
    while len(out) < count:
        data, _, phrases = scene_png(seed)
        seed += 1
        unique = list(dict.fromkeys(phrases))
        if len(unique) >= PHRASES_PER_IMAGE:
            out.append((data, unique[:PHRASES_PER_IMAGE]))
    return out, seed


def separate(url: str, images: list[tuple[bytes, list[str]]], concurrency: int) -> dict[str, Any]:
    payloads = [Payload(data, phrase) for data, phrases in images for phrase in phrases]
    result = run(lambda: closed_loop(url, payloads, concurrency, 600.0, len(payloads), 120.0))
    summary = result.summary()
    visions = [r.timing_ms["vision"] for r in result.records if r.timing_ms]
    return {
        "requests": summary["requests"],
        "phrases": summary["requests"],
        "phrases_per_s": summary["throughput_rps"],
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "cache_hits": summary["cache_hits"],
        "mean_vision_ms_per_request": round(statistics.fmean(visions), 2),
        "mean_batch_size": summary["mean_batch_size"],
        "statuses": summary["statuses"],
    }


def one_request_each(url: str, images: list[tuple[bytes, list[str]]]) -> dict[str, Any]:
    check_loopback(url)
    latencies, visions, hits = [], [], 0
    with httpx.Client(base_url=url, timeout=120.0) as client:
        start = time.monotonic()
        for data, phrases in images:
            sent = time.perf_counter()
            response = client.post(
                "/ground", files={"image": ("scene.png", data, "image/png")}, data={"phrase": phrases}
            )
            latencies.append((time.perf_counter() - sent) * 1000)
            response.raise_for_status()
            body = response.json()
            if len(body["results"]) != len(phrases):
                raise RuntimeError(f"{len(body['results'])} results for {len(phrases)} phrases")
            visions.append(body["timing_ms"]["vision"])
            hits += sum(item["cache"] == "hit" for item in body["results"])
        wall = time.monotonic() - start
    return {
        "requests": len(images),
        "phrases": len(images) * PHRASES_PER_IMAGE,
        "phrases_per_s": round(len(images) * PHRASES_PER_IMAGE / wall, 3),
        "p50_ms": round(percentile(latencies, 50) or 0.0, 1),
        "p99_ms": round(percentile(latencies, 99) or 0.0, 1),
        "cache_hits": hits,
        "mean_vision_ms_per_request": round(statistics.fmean(visions), 2),
        "mean_batch_size": float(PHRASES_PER_IMAGE),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Embedding-cache gain on a local nuwa-serve.")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--images", type=int, default=12, help="images per mode (x 8 phrases)")
    parser.add_argument("--max-new-tokens", default="8")
    parser.add_argument("--out", type=Path, required=True)
    args, loads = start_benchmark(parser, argv)
    model_dir = args.model or default_model_dir()
    log_dir = Path(tempfile.mkdtemp(prefix="nuwa-bench-cache-"))
    seed = 5_000
    warmup, seed = images_with_phrases(2, seed)
    sets: dict[str, dict[str, list[tuple[bytes, list[str]]]]] = {}
    for name in SETTINGS:
        sets[name] = {}
        for mode in ("sequential", "concurrent", "one_request"):
            sets[name][mode], seed = images_with_phrases(args.images, seed)

    # Both servers up for the whole run (an idle one costs about 0.2% of a core), the modes interleaved and the
    # order of the two servers alternated, so drift of the shared machine does not land on one setting.
    results: dict[str, dict[str, Any]] = {name: {} for name in SETTINGS}
    servers = {}
    try:
        for name, extra in SETTINGS.items():
            servers[name] = start_service(
                model_dir, log_dir, name.split()[1], max_new_tokens=args.max_new_tokens, **extra
            )
        for server in servers.values():
            server.wait_ready()
            separate(server.base_url, warmup, 4)
        for turn, mode in enumerate(("sequential", "concurrent", "one_request")):
            names = list(SETTINGS) if turn % 2 == 0 else list(reversed(SETTINGS))
            for name in names:
                url = servers[name].base_url
                key = f"{name}:{mode}"
                loads.before(key)
                images = sets[name][mode]
                if mode == "one_request":
                    results[name][mode] = one_request_each(url, images)
                else:
                    results[name][mode] = separate(url, images, 1 if mode == "sequential" else 8)
                loads.after(key)
                results[name][mode]["load"] = loads.runs[key]
                logger.info("%s %s: %s", name, mode, results[name][mode])
    finally:
        for server in servers.values():
            server.stop()

    on, off = results["cache on (256 MB)"], results["cache off (0)"]
    gains = {
        mode: {
            "throughput_on_over_off": round(on[mode]["phrases_per_s"] / off[mode]["phrases_per_s"], 3),
            "vision_ms_on": on[mode]["mean_vision_ms_per_request"],
            "vision_ms_off": off[mode]["mean_vision_ms_per_request"],
        }
        for mode in on
    }
    for name in results:
        base = results[name]["sequential"]["phrases_per_s"]
        results[name]["one_request_over_sequential"] = round(
            results[name]["one_request"]["phrases_per_s"] / base, 3
        )
    out = {
        "model_dir": str(model_dir),
        "machine": "2-core CPU shared with other work, no GPU; worker 1 torch thread",
        "images_per_mode": args.images,
        "phrases_per_image": PHRASES_PER_IMAGE,
        "max_new_tokens": args.max_new_tokens,
        "results": results,
        "gains": gains,
        "load_average": loads.to_json(),
        "logs": str(log_dir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    logger.info("gains: %s", gains)


if __name__ == "__main__":
    main()

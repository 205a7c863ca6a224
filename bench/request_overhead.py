"""Request-path overhead on an idle server: client latency minus the model's own stages.

One request at a time (200 by default) against a real `python -m service` on loopback, each with its own image
(a new image per request: the embedding cache never hits, so every request runs the whole path). For each
request the client measures send -> full response with `time.perf_counter`, and the response's `timing_ms` says
where the server spent it. The model's own stages are

    model = preprocess + wait + vision + prune + prefill + decode        (worker, per batch; batch = 1 here)

and everything else is the request path:

    overhead   = client latency - model
               = queue + ipc + image_decode + server_rest + client_rest
    server_rest = total - queue - ipc - image_decode - model   (API process: body, multipart, header probe,
                                                                 admission, dispatch, response building)
    client_rest = client latency - total                        (HTTP on loopback both ways, response bytes,
                                                                 the client's own parsing; `total` starts when
                                                                 the middleware sees the request)

`image_decode` (worker-side decode of the encoded bytes, JPEG at reduced DCT scale) and `ipc` (the request to the
worker and the answer back) are counted as overhead: they are on the request path and not the model's work.
An HTTP floor is measured in the same run: GET /readyz, sequentially, the cheapest round trip the server has.

Two images: a 336 px contract-scene PNG (the built-in model's input size) and a 12-megapixel JPEG (4000x3000,
the scene scaled up plus noise, q=90), the same pixels with new bytes per request (`bench.payloads.with_comment`).

Usage: ``python -m bench.request_overhead --out bench/results/request_overhead.json``
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import check_loopback, summarise
from bench.payloads import LARGE_SIZE, SeedBlock, large_jpeg, scene_png, with_comment
from bench.quiet import start_benchmark
from bench.server import default_model_dir, start_service

logger = logging.getLogger(__name__)

MODEL_STAGES = ("preprocess", "wait", "vision", "prune", "prefill", "decode")
PARTS = ("queue", "ipc", "image_decode", "server_rest", "client_rest")


def overhead_of(client_ms: float, timing: dict[str, float]) -> dict[str, float]:
    """Split one request's client latency into the model's stages and the request path's parts (ms)."""
    model = sum(timing[stage] for stage in MODEL_STAGES)
    server_rest = timing["total"] - timing["queue"] - timing["ipc"] - timing["image_decode"] - model
    return {
        "client": client_ms,
        "model": model,
        "overhead": client_ms - model,
        "queue": timing["queue"],
        "ipc": timing["ipc"],
        "image_decode": timing["image_decode"],
        "server_rest": server_rest,
        "client_rest": client_ms - timing["total"],
    }


def sequential(
    client: httpx.Client, bodies: list[tuple[bytes, str, str, str]], fields: dict[str, str]
) -> list[dict[str, Any]]:
    """POST /ground once per body, one after the other; each row: overhead parts + cache + batch size."""
    rows = []
    for data, phrase, filename, content_type in bodies:
        start = time.perf_counter()
        response = client.post(
            "/ground", files={"image": (filename, data, content_type)}, data={"phrase": phrase, **fields}
        )
        body = response.content
        client_ms = (time.perf_counter() - start) * 1000
        if response.status_code != 200:
            raise RuntimeError(f"/ground answered {response.status_code}: {body[:500]!r}")
        parsed = json.loads(body)
        row: dict[str, Any] = overhead_of(client_ms, parsed["timing_ms"])
        row["cache"] = parsed["cache"]
        row["batch_size"] = parsed["batch_size"]
        rows.append(row)
    return rows


def http_floor(client: httpx.Client, count: int) -> list[float]:
    """Client latency (ms) of sequential GET /readyz: loopback HTTP + the framework, no work."""
    out = []
    for _ in range(count):
        start = time.perf_counter()
        response = client.get("/readyz")
        response.read()
        out.append((time.perf_counter() - start) * 1000)
    return out


def png_bodies(seeds: SeedBlock, count: int) -> list[tuple[bytes, str, str, str]]:
    first = seeds.take(count)
    bodies = []
    for seed in range(first, first + count):
        data, phrase, _ = scene_png(seed)
        bodies.append((data, phrase, "scene.png", "image/png"))
    return bodies


def jpeg_bodies(base: bytes, phrase: str, tag: str, count: int) -> list[tuple[bytes, str, str, str]]:
    return [(with_comment(base, f"{tag}-{i}"), phrase, "photo.jpg", "image/jpeg") for i in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Request-path overhead on an idle local nuwa-serve.")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: built-in)")
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per image kind")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-new-tokens", default="8")
    parser.add_argument("--log-level", default="WARNING", help="NUWA_LOG_LEVEL of the server")
    parser.add_argument("--out", type=Path, required=True)
    args, loads = start_benchmark(parser, argv)
    model_dir = args.model or default_model_dir()
    seeds = SeedBlock()

    logger.info("making images")
    warm_png = png_bodies(seeds, args.warmup)
    pngs = png_bodies(seeds, args.requests)
    base_jpeg, jpeg_phrase = large_jpeg(seed=7)
    warm_jpeg = jpeg_bodies(base_jpeg, jpeg_phrase, "warm", max(2, args.warmup // 2))
    jpegs = jpeg_bodies(base_jpeg, jpeg_phrase, "run", args.requests)

    log_dir = Path(tempfile.mkdtemp(prefix="nuwa-bench-overhead-"))
    settings = {"max_new_tokens": args.max_new_tokens, "log_level": args.log_level}
    service = start_service(model_dir, log_dir, "overhead", **settings)
    results: dict[str, Any] = {}
    try:
        service.wait_ready()
        check_loopback(service.base_url)
        with httpx.Client(base_url=service.base_url, timeout=120.0) as client:
            sequential(client, warm_png, {})
            sequential(client, warm_jpeg, {})
            http_floor(client, 20)
            for name, bodies in (("png_336", pngs), ("jpeg_12mp", jpegs)):
                loads.before(name)
                floor = http_floor(client, 100)
                rows = sequential(client, bodies, {})
                loads.after(name)
                numeric = [{key: row[key] for key in ("client", "model", "overhead", *PARTS)} for row in rows]
                results[name] = {
                    "image_bytes": len(bodies[0][0]),
                    "requests": len(rows),
                    "cache_hits": sum(row["cache"] == "hit" for row in rows),
                    "batch_sizes": sorted({row["batch_size"] for row in rows}),
                    "http_floor_get_readyz_ms": summarise([{"floor": v} for v in floor])["floor"],
                    "ms": summarise(numeric),
                    "rows": [{key: round(value, 3) for key, value in row.items()} for row in numeric],
                }
                logger.info("%s: %s", name, {k: v["p50"] for k, v in results[name]["ms"].items()})
    finally:
        code = service.stop()
    out = {
        "model_dir": str(model_dir),
        "machine": f"{platform.processor() or platform.machine()}, 2 shared cores, no GPU; worker 1 torch thread",
        "server_settings": {**settings, "torch_threads": "1", "embed_cache_mb": "default (256)"},
        "definition": "overhead = client latency - (preprocess + wait + vision + prune + prefill + decode); "
        "parts: queue, ipc, image_decode, server_rest, client_rest",
        "jpeg_size": list(LARGE_SIZE),
        "results": results,
        "load_average": loads.to_json(),
        "exit_code": code,
        "logs": str(log_dir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

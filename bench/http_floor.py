"""The floors under the request path on this machine: an HTTP round trip to a route that does nothing, and the
image decode alone.

The same client as every serving benchmark (httpx, one keep-alive connection, sequential requests) posts the same
multipart bodies as `bench.request_overhead` to a route that reads the body and answers 8 bytes, served by uvicorn
on uvloop on 127.0.0.1 in a child process, four ways: uvicorn's h11 protocol (what nuwa-serve runs: its
hostile-traffic guards build on it) or httptools, each under FastAPI (one POST route) and as a bare ASGI
callable. Two bodies: a 336 px PNG form (about 2 KB) and a 3 MB file part (the 12 MP JPEG's size).

No image is decoded and no model runs, so what nuwa-serve adds to a request on top of this floor is its own work.
The decode floor is `service.images.decode_for_model` on the same PNG at the model's size, in process, in a warm
loop (what the worker's decode would cost with nothing else around it).
httptools is not a project dependency (`pip install httptools` for those rows; they are skipped without it).

Usage: ``python -m bench.http_floor --out bench/results/http_floor.json``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import multiprocessing
import os
import platform
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

from bench.loadgen import summarise
from bench.payloads import scene_png
from bench.quiet import start_benchmark
from bench.server import free_port

logger = logging.getLogger(__name__)

ANSWER = b'{"ok":true}'


def _serve(protocol: str, framework: str, port: int) -> None:
    """Child process: uvicorn on 127.0.0.1:`port` with a route that reads the body and answers `ANSWER`."""

    async def bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": ANSWER})

    app: Any = bare
    if framework == "fastapi":
        app = FastAPI()

        @app.post("/echo")
        async def echo(request: Request) -> Response:
            await request.body()
            return Response(ANSWER, media_type="application/json")

    uvicorn.run(
        app, host="127.0.0.1", port=port, http=protocol, loop="uvloop", log_level="warning", access_log=False
    )


def _wait_listening(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.post(url, content=b"", timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not start within {timeout_s} s")


def round_trips(url: str, body: dict[str, Any], count: int, warmup: int) -> list[float]:
    """Client latency (ms) of `count` sequential POSTs of `body` after `warmup` unmeasured ones."""
    out = []
    with httpx.Client(timeout=60.0) as client:
        for index in range(warmup + count):
            start = time.perf_counter()
            response = client.post(url, **body)
            response.read()
            elapsed = (time.perf_counter() - start) * 1000
            if response.status_code != 200:
                raise RuntimeError(f"{url} answered {response.status_code}")
            if index >= warmup:
                out.append(elapsed)
    return out


def decode_floor(data: bytes, count: int) -> dict[str, float]:
    """`decode_for_model` of `data` at 336 px, `count` times after a warm-up: p50 / p99 / mean in ms."""
    from service.images import decode_for_model

    for _ in range(20):
        decode_for_model(data, (336, 336))
    values = []
    for _ in range(count):
        start = time.perf_counter()
        decode_for_model(data, (336, 336))
        values.append((time.perf_counter() - start) * 1000)
    return {**summarise([{"ms": value} for value in values])["ms"], "count": count}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="HTTP round trip to a do-nothing route (the request-path floor)."
    )
    parser.add_argument("--requests", type=int, default=300, help="per body and server")
    parser.add_argument("--out", type=Path, required=True)
    args, loads = start_benchmark(parser, argv)
    png, phrase, _ = scene_png(7)
    bodies = {
        "png_form": (
            len(png),
            {"files": {"image": ("scene.png", png, "image/png")}, "data": {"phrase": phrase}},
            args.requests,
        ),
        "3mb_form": (
            3_000_000,
            {
                "files": {"image": ("photo.jpg", os.urandom(3_000_000), "image/jpeg")},
                "data": {"phrase": phrase},
            },
            max(20, args.requests // 5),
        ),
    }
    protocols = ["h11"] + (["httptools"] if importlib.util.find_spec("httptools") else [])
    results: dict[str, Any] = {}
    context = multiprocessing.get_context("spawn")
    for protocol in protocols:
        for framework in ("fastapi", "bare"):
            name = f"{protocol}/{framework}"
            port = free_port()
            child = context.Process(target=_serve, args=(protocol, framework, port), daemon=True)
            child.start()
            try:
                url = f"http://127.0.0.1:{port}/echo"
                _wait_listening(url)
                loads.before(name)
                for body_name, (size, body, count) in bodies.items():
                    values = round_trips(url, body, count, warmup=max(5, count // 10))
                    summary = summarise([{"ms": value} for value in values])["ms"]
                    results.setdefault(body_name, {"bytes": size})[name] = {**summary, "requests": count}
                loads.after(name)
            finally:
                child.terminate()
                child.join(10)
            logger.info("%s: %s", name, {b: results[b][name]["p50"] for b in bodies})
    decode = decode_floor(png, 500)
    logger.info("decode_for_model of the PNG: %s", decode)
    out = {
        "machine": f"{platform.processor() or platform.machine()}, 2 shared cores, no GPU",
        "client": "httpx, one keep-alive connection, sequential",
        "server": "uvicorn on uvloop, 127.0.0.1, one worker; FastAPI: one POST route reading the body",
        "results": results,
        "decode_png_ms": decode,
        "load_average": loads.to_json(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()

"""The worker's image decoding for one batch (`service.batch_decoder`) at 1, 2, ... decode threads.

A batch of 8 different 12-megapixel JPEGs (`bench.payloads.large_jpeg`, 4000x3000, q=90: phone photos) and a batch
of 8 different 336 px PNGs, each decoded to the built-in model's decode size by a fresh `BatchDecoder` (no reuse),
the thread counts alternated round by round in one process (median of `--repeats`), so the ratio holds on a shared
machine. It is the reader thread's decode time per batch, which the device waits for when it is longer than a
batch's model run.

Usage: ``python -m bench.decode_threads --out bench/results/decode_threads.json``
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from bench.payloads import large_jpeg, scene_png
from bench.quiet import start_benchmark
from service.batch_decoder import BatchDecoder
from service.messages import ImageBlob, WorkItem

logger = logging.getLogger(__name__)


def _items(kind: str, count: int) -> list[WorkItem]:
    from models.budget import PruningConfig

    items = []
    for index in range(count):
        if kind == "jpeg_12mp":
            data, phrase = large_jpeg(seed=900 + index)
            blob = ImageBlob(data, "JPEG", (4000, 3000))
        else:
            data, phrase, _ = scene_png(900 + index)
            blob = ImageBlob(data, "PNG", (336, 336))
        items.append(
            WorkItem(
                request_id=f"{kind}-{index}",
                kind="ground",
                text=phrase,
                config=PruningConfig(),
                max_new_tokens=8,
                image=blob,
                deadline=time.monotonic() + 3600,
            )
        )
    return items


def main(argv: list[str] | None = None) -> None:
    from models.builtin import BUILTIN_MODEL_DIR
    from models.loading import load_runner

    parser = argparse.ArgumentParser(description="Batch image decoding at several thread counts, alternated.")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, required=True)
    args, loads = start_benchmark(parser, argv)
    geometry = load_runner(BUILTIN_MODEL_DIR, "cpu").geometry
    results: dict[str, Any] = {}
    for kind in ("jpeg_12mp", "png_336"):
        items = _items(kind, args.batch_size)
        times: dict[int, list[float]] = {threads: [] for threads in args.threads}
        loads.before(kind)
        for repeat in range(args.repeats + 1):  # round 0 warms up and is not counted
            for threads in args.threads if repeat % 2 else args.threads[::-1]:
                decoder = BatchDecoder(geometry.decode_size, geometry.resample, threads)
                start = time.perf_counter()
                decoded = decoder.decode(items)
                elapsed = (time.perf_counter() - start) * 1000
                decoder.close()
                assert all(d.error is None for d in decoded)
                if repeat:
                    times[threads].append(elapsed)
        loads.after(kind)
        medians = {threads: statistics.median(values) for threads, values in times.items()}
        base = medians[args.threads[0]]
        results[kind] = {
            "batch_size": args.batch_size,
            "image_bytes_each": len(items[0].image.data),
            "decoded_size": list(decoded[0].image.size),
            "ms_per_batch_median": {str(t): round(m, 1) for t, m in medians.items()},
            f"speedup_over_{args.threads[0]}_thread": {
                str(t): round(base / m, 2) for t, m in medians.items()
            },
            "times_ms": {str(t): [round(v, 1) for v in values] for t, values in times.items()},
            "load": loads.runs[kind],
        }
        logger.info("%s: %s", kind, {k: v for k, v in results[kind].items() if k != "times_ms"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "load_average": loads.to_json()}, indent=1))


if __name__ == "__main__":
    main()

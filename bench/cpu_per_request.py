"""CPU time per request, per process, for nuwa-serve and the LitServe peer: where the work goes when cores are short.

On a shared machine throughput follows the CPU each request costs more than any overlap of stages, so this counts
it directly: user + system CPU seconds of every process of a server (read from /proc before and after a closed
loop), divided by the requests answered, for each process of the server (nuwa-serve: the API process and its
model worker; LitServe: its launcher, HTTP server and inference worker). Same load as `bench/side_by_side.py` (every request
its own image, unpruned, concurrency `--concurrency`), one server at a time.

Usage: ``python -m bench.cpu_per_request --out bench/results/cpu_per_request.json``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.loadgen import Payload, closed_loop, run
from bench.payloads import SeedBlock, distinct_scenes
from bench.peer import start_peer
from bench.quiet import start_benchmark
from bench.server import default_model_dir, start_service

logger = logging.getLogger(__name__)
TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (via /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(child) for child in handle.read().split())
        except FileNotFoundError:
            continue
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")[:120].strip()
    except FileNotFoundError:
        return "?"


def measure(root: int, url: str, payloads: list[Payload], concurrency: int) -> dict[str, Any]:
    """Closed loop; CPU ms per answered request of the launched process and of each process below it."""
    pids = descendants(root)
    before = {pid: cpu_seconds(pid) for pid in pids}
    result = run(lambda: closed_loop(url, payloads, concurrency, 600.0, len(payloads), 120.0))
    after = {pid: cpu_seconds(pid) for pid in pids}
    summary = result.summary()
    answered = summary["statuses"].get("200", 0)
    per_process = [
        {
            "pid": pid,
            "role": "launched process" if pid == root else "child",
            "command": _command(pid),
            "cpu_ms_per_request": round((after[pid] - before[pid]) * 1000 / answered, 2),
        }
        for pid in pids
    ]
    total = sum(after[pid] - before[pid] for pid in pids)
    return {
        "requests": answered,
        "throughput_rps": summary["throughput_rps"],
        "wall_s": summary["wall_s"],
        "cpu_ms_per_request_total": round(total * 1000 / answered, 2),
        "cpu_cores_used": round(total / summary["wall_s"], 3),
        "per_process": per_process,
        "mean_batch_size": summary["mean_batch_size"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="CPU ms per request per process, nuwa-serve vs the peer.")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args, loads = start_benchmark(parser, argv)
    model_dir = args.model or default_model_dir()
    log_dir = Path(tempfile.mkdtemp(prefix="nuwa-bench-cpu-"))
    seeds = SeedBlock(next_seed=40_000)
    results: dict[str, Any] = {}
    for side in ("peer", "nuwa-serve", "peer again", "nuwa-serve again"):
        warm = distinct_scenes(seeds.take(16), 16)
        payloads = distinct_scenes(seeds.take(args.requests), args.requests, {"method": "none"})
        if side.startswith("peer"):
            server = start_peer(
                model_dir, log_dir / f"{side}.log", max_new_tokens=args.max_new_tokens, threads=1
            )
        else:
            server = start_service(
                model_dir, log_dir, side.replace(" ", "-"), max_new_tokens=str(args.max_new_tokens)
            )
        try:
            server.wait_ready()
            run(lambda s=server, w=warm: closed_loop(s.base_url, w, 4, 120.0, len(w), 120.0))
            loads.before(side)
            results[side] = measure(server.process.pid, server.base_url, payloads, args.concurrency)
            loads.after(side)
            results[side]["load"] = loads.runs[side]
            logger.info("%s: %s", side, results[side])
        finally:
            server.stop()
    out = {
        "model_dir": str(model_dir),
        "concurrency": args.concurrency,
        "note": "nuwa-serve: launched process = API (uvicorn), child = model worker; LitServe: the launched "
        "process starts the HTTP server and inference worker processes (children)",
        "results": results,
        "load_average": loads.to_json(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

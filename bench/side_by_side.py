"""nuwa-serve against the plainest alternative, in ONE run: LitServe + transformers `generate()`, same checkpoint.

Servers, alternating per point on the same machine, both up the whole run; the peer is frozen (SIGSTOP on its
process group) outside its own points, because idle, LitServe's inference loop polls its queue and costs about
10% of a core, which would slow nuwa-serve's points (idle nuwa-serve costs about 0.2% of a core):
- peer: `bench/peer_litserve.py` in `.bench-venv` (LitServe dynamic batching, max_batch_size 8,
  batch_timeout 0.01 s, greedy `generate()`), unpruned (it cannot prune);
- nuwa-serve: `python -m service`, defaults (max batch 8, max wait 10 ms, pipeline depth 2, embedding cache on),
  three request kinds: `method=none` (unpruned), `method=nuwa budget=0.5`, `method=nuwa budget=0.25`.
Both: the same checkpoint, the same `max_new_tokens`, the same torch threads (NUWA_TORCH_THREADS =
torch.set_num_threads = OMP_NUM_THREADS), loopback only.

Load: closed loop (`bench.loadgen.closed_loop`) at concurrency 1, 4 and 16, a fixed number of requests per point,
EVERY request its own image (disjoint seed blocks across all points and servers), so the embedding cache never hits
and cannot flatter nuwa-serve (its gain is measured separately by `bench/cache_gain.py`). The 336 px PNG contract
scenes are square, so the peer's stock processor (resize + centre crop) and our runner (pad to square + resize)
feed the vision tower the same pixels, and both servers must give the same answer: checked first on a few
images (raw model output compared token string for token string).

Pairing, because the shared machine's speed drifts by 10-30% within minutes: per concurrency, `--rounds`
rounds run back to back (the peer, then nuwa-serve unpruned, 50%, 25%; every second round in the reverse
order), so the points one ratio compares ran within a few seconds of each other. A round's ratio is a kind's
throughput over the peer's in that round; the reported ratio is the median of the rounds' ratios (a slow moment
that hits one point of one round moves it less than it moves a mean), next to the ratio of the mean throughputs.

Usage: ``python -m bench.side_by_side --out bench/results/side_by_side.json``
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

from bench.loadgen import Payload, closed_loop, run
from bench.payloads import SeedBlock, distinct_scenes
from bench.peer import start_peer
from bench.quiet import LoadAverages, start_benchmark
from bench.server import default_model_dir, start_service

logger = logging.getLogger(__name__)

NUWA_KINDS: dict[str, dict[str, str]] = {
    "nuwa-serve unpruned": {"method": "none"},
    "nuwa-serve Nüwa 50%": {"method": "nuwa", "budget": "0.5"},
    "nuwa-serve Nüwa 25%": {"method": "nuwa", "budget": "0.25"},
}
PEER = "LitServe + generate() (unpruned)"


def requests_at(concurrency: int, scale: float) -> int:
    """Requests per closed-loop point: enough batches at 16 in flight for a steady state."""
    base = {1: 60, 4: 120, 16: 256}.get(concurrency, 16 * concurrency)
    return max(concurrency * 2, round(base * scale))


def same_answers(peer_url: str, nuwa_url: str, payloads: list[Payload]) -> list[dict[str, Any]]:
    """Raw output of both servers for the same images (nuwa-serve unpruned), one at a time."""

    def normalise(text: str) -> str:
        return text.replace("</s>", "").strip()

    rows = []
    with httpx.Client(timeout=120.0) as client:
        for payload in payloads:
            files = {"image": ("scene.png", payload.image, "image/png")}
            peer = client.post(f"{peer_url}/ground", files=files, data={"phrase": payload.phrase}).json()
            ours = client.post(
                f"{nuwa_url}/ground", files=files, data={"phrase": payload.phrase, "method": "none"}
            ).json()
            rows.append(
                {
                    "phrase": payload.phrase,
                    "peer": peer["raw_output"],
                    "nuwa_serve": ours["raw_output"],
                    "same": normalise(peer["raw_output"]) == normalise(ours["raw_output"]),
                }
            )
    return rows


def measure(
    url: str, label: str, payloads: list[Payload], concurrency: int, loads: LoadAverages, key: str
) -> dict[str, Any]:
    loads.before(key)
    result = run(lambda: closed_loop(url, payloads, concurrency, 600.0, len(payloads), 120.0, label=label))
    loads.after(key)
    summary = result.summary()
    visions = [r.timing_ms["vision"] for r in result.records if r.timing_ms]
    point = {
        "server": label,
        "concurrency": concurrency,
        "requests": summary["requests"],
        "throughput_rps": summary["throughput_rps"],
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "statuses": summary["statuses"],
        "cache_hits": summary["cache_hits"],
        "mean_batch_size": summary["mean_batch_size"],
        "mean_stage1_tokens": summary["mean_stage1_tokens"],
        "mean_vision_ms": round(statistics.fmean(visions), 2) if visions else None,
        "load": loads.runs[key],
    }
    logger.info("%s", point)
    return point


def warm(url: str, payloads: list[Payload], fields: dict[str, str]) -> None:
    warmed = [Payload(p.image, p.phrase, dict(fields)) for p in payloads]
    run(lambda: closed_loop(url, warmed, 4, 120.0, len(warmed), 120.0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="nuwa-serve vs LitServe + generate(), one run, loopback.")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: built-in)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--scale", type=float, default=1.0, help="x the requests per point (smoke: 0.1)")
    parser.add_argument("--rounds", type=int, default=1, choices=range(1, 7), metavar="1..6")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both model processes")
    parser.add_argument("--check-images", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True)
    args, loads = start_benchmark(parser, argv)
    model_dir = args.model or default_model_dir()
    log_dir = Path(tempfile.mkdtemp(prefix="nuwa-bench-peer-"))
    seeds = SeedBlock()
    started = time.monotonic()

    logger.info("rendering images (each request its own)")
    check = distinct_scenes(seeds.take(args.check_images), args.check_images)
    nuwa_warm = distinct_scenes(seeds.take(16), 16, {"method": "none"})
    # (concurrency, round, label, payloads): per concurrency its rounds back to back, so paired points are close
    plan: list[tuple[int, int, str, list[Payload]]] = []
    for concurrency in args.concurrency:
        for round_index in range(args.rounds):
            labels = [PEER, *NUWA_KINDS] if round_index % 2 == 0 else [*NUWA_KINDS, PEER]
            for label in labels:
                count = requests_at(concurrency, args.scale)
                payloads = distinct_scenes(seeds.take(count), count, NUWA_KINDS.get(label, {}))
                plan.append((concurrency, round_index, label, payloads))
    peer_warm = distinct_scenes(seeds.take(16), 16)
    logger.info("rendered %d images in %.0f s", seeds.next_seed - 1000, time.monotonic() - started)

    points: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    nuwa = start_service(
        model_dir, log_dir, "nuwa", max_new_tokens=str(args.max_new_tokens), torch_threads=str(args.threads)
    )
    peer = start_peer(
        model_dir, log_dir / "peer.log", max_new_tokens=args.max_new_tokens, threads=args.threads
    )
    try:
        nuwa.wait_ready()
        peer.wait_ready()
        warm(nuwa.base_url, nuwa_warm, {"method": "none"})
        warm(peer.base_url, peer_warm, {})
        if args.check_images:
            checks = same_answers(peer.base_url, nuwa.base_url, check)
            logger.info("same answers: %d of %d", sum(c["same"] for c in checks), len(checks))
        peer.freeze()
        loads.gate()  # with the peer frozen: its idle polling would hold the load average up
        for concurrency, round_index, label, payloads in plan:
            key = f"c{concurrency}:r{round_index}:{label}"
            if label == PEER:
                peer.thaw()
                try:
                    point = measure(peer.base_url, label, payloads, concurrency, loads, key)
                finally:
                    peer.freeze()
            else:
                point = measure(nuwa.base_url, label, payloads, concurrency, loads, key)
            point["round"] = round_index
            points.append(point)
    finally:
        peer.stop()
        nuwa_exit = nuwa.stop()

    ratios = []
    for concurrency in args.concurrency:

        def by_round(label: str, c: int = concurrency) -> dict[int, float]:
            """Round -> throughput of `label` at this concurrency."""
            return {
                p["round"]: p["throughput_rps"]
                for p in points
                if p["server"] == label and p["concurrency"] == c
            }

        peer = by_round(PEER)
        peer_rps = statistics.fmean(peer.values())
        row: dict[str, Any] = {"concurrency": concurrency, "peer_rps": round(peer_rps, 3)}
        for label in NUWA_KINDS:
            ours = by_round(label)
            rounds = [ours[r] / peer[r] for r in sorted(ours) if r in peer]  # over the peer, per round
            ours_rps = statistics.fmean(ours.values())
            row[label] = {
                "rps": round(ours_rps, 3),
                "x_peer": round(statistics.median(rounds), 3),
                "x_peer_per_round": [round(r, 3) for r in rounds],
                "x_peer_of_means": round(ours_rps / peer_rps, 3),
            }
        ratios.append(row)
        logger.info("ratios %s", row)

    out = {
        "model_dir": str(model_dir),
        "machine": "2-core CPU shared with other work, no GPU",
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "order": "per concurrency, its rounds back to back; per round: peer, then the three nuwa-serve kinds "
        "(rounds 2, 4, ...: reversed); the peer frozen (SIGSTOP) outside its points",
        "ratio": "x_peer = median over rounds of (kind's req/s / the peer's req/s in the same round)",
        "nuwa_exit_code": nuwa_exit,
        "peer": {
            "what": "LitServe (litserve 0.2.19) LitAPI + transformers 5.23.0 LlavaForConditionalGeneration.generate "
            "(greedy), stock processor + chat template, prompt 'Locate {phrase}.'",
            "max_batch_size": 8,
            "batch_timeout_s": 0.01,
        },
        "nuwa_serve": {
            "settings": "defaults: max_batch_size 8, max_wait_ms 10, pipeline_depth 2, embed cache 256 MB"
        },
        "same_answers": checks,
        "points": points,
        "ratios": ratios,
        "load_average": loads.to_json(),
        "wall_s": round(time.monotonic() - started, 1),
        "logs": str(log_dir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    logger.info("wrote %s in %.0f s", args.out, out["wall_s"])


if __name__ == "__main__":
    main()

"""The one-shot GPU check (issue 16), driven by `bench/gpu_check.sh`: four steps, JSON under bench/results/,
one summary table at the end. Every step has its own time limit, so one slow step cannot eat the others'.

1. ``service``: `python -m service` on cuda:0 with the committed built-in model (the real deployment path): the
   README request (examples/scene.png, "the red circle"), 32 concurrent requests (contract scenes), the same
   32 one at a time (batched results must equal solo results: same raw output), and one 12.8 MP request.
2. ``speed``: `bench/model_speed.py` on the random-weight 7B shapes of `bench/shapes.py` (every name in
   `SHAPES`, so a shape added there is picked up): LLaVA at 64/128/192 tokens (the paper's setting), every other
   shape at 25/50/75% keep ratio; none / nuwa / fastv; batch 1 and 8; bf16 peak memory per row and the
   weights' memory per model, all from the same run.
3. ``memory``: `bench/vision_memory.py` on CUDA with the REAL Qwen2.5-VL-7B vision tower (32 blocks,
   full attention 7/15/23/31) and CLIP-L/336: allocator peak of the bare tower and of vision + stage 1 at 0.5,
   2, 4 and 12.8 MP.
4. ``decode``: `bench/decode_step.py` on the same 7B/8B shapes in bf16: the stock decode step vs the fast one
   (`models.fast_decode`), batch 1 and 8, logits compared at every step. Last, so that a slow run of it costs
   nothing the other steps measure.

`--dry-run` runs the same logic on the CPU with small shapes (service on cpu, `--smoke` shapes, fewer sizes), so
the one GPU call is spent measuring, not debugging. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench.gpu_check")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
RED_CIRCLE = (48, 64, 128, 144)  # examples/scene.png, the README request's target
README_BOX = (47.88, 66.024, 131.88, 143.976)  # the box README.md shows (CPU, PIL preprocessing)
CONCURRENT = 32
SHORT_NAMES = {"qwen2_5_vl_7b_vision": "Qwen2.5-VL-7B vision", "llava_1_5_clip": "CLIP-L/336"}


def _token_budgets(shape: str) -> list[str]:
    """LLaVA-1.5: the paper's 64/128/192 tokens; any other shape: keep ratios."""
    return ["64", "128", "192"] if shape.startswith("llava") else ["0.25", "0.5", "0.75"]


# ---------------------------------------------------------------------------------------------------- service
def _ground_fields(phrase: str) -> dict[str, str]:
    return {"phrase": phrase}


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def _concurrent(base_url: str, payloads: list[tuple[bytes, str]], timeout: float) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as client:

        async def one(image: bytes, phrase: str) -> dict:
            start = time.perf_counter()
            response = await client.post(
                "/ground", files={"image": ("scene.png", image, "image/png")}, data=_ground_fields(phrase)
            )
            return {
                "status": response.status_code,
                "seconds": time.perf_counter() - start,
                "body": response.json(),
            }

        return list(await asyncio.gather(*(one(image, phrase) for image, phrase in payloads)))


def step_service(args: argparse.Namespace) -> dict:
    import httpx

    from bench.vision_memory import image_size_for, scene
    from models.builtin.scenes import iou, make_grounding_item, render
    from tests.support import launcher

    model_dir = launcher.builtin_or_random_model(Path(tempfile.gettempdir()) / "nuwa-bench")
    settings = {
        "device": args.device,
        "log_level": "WARNING",
        "max_batch_size": "8",
        "max_wait_ms": "20",
        "max_queue_requests": "128",
        "request_timeout_s": "120",
        "max_body_bytes": str(64 * 1024 * 1024),
    }
    log_path = Path(tempfile.mkdtemp(prefix="nuwa-gpu-check-")) / "service.log"
    service = launcher.start_service(model_dir, log_path, settings)
    result: dict[str, Any] = {"model_dir": str(model_dir), "settings": settings}
    try:
        result["ready_s"] = service.wait_ready(timeout_s=180)
        with httpx.Client(base_url=service.base_url, timeout=120) as client:
            health = client.get("/healthz").json()
            result["healthz"] = {k: health.get(k) for k in ("status", "device", "model") if k in health}
            example = (REPO / "examples" / "scene.png").read_bytes()
            response = client.post(
                "/ground",
                files={"image": ("scene.png", example, "image/png")},
                data=_ground_fields("the red circle"),
            )
            body = response.json()
            box = body["boxes"][0]["xyxy"] if response.status_code == 200 and body.get("boxes") else None
            result["readme"] = {
                "status": response.status_code,
                "box": box,
                "iou_with_target": iou(box, RED_CIRCLE) if box else 0.0,
                "iou_with_readme_box": iou(box, README_BOX) if box else 0.0,
                "raw_output": body.get("raw_output"),
                "timing_ms": body.get("timing_ms"),
            }
            items = [make_grounding_item(random.Random(1000 + i), 336) for i in range(CONCURRENT)]
            payloads = [(_png(render(item.scene)), item.phrase) for item in items]
            start = time.perf_counter()
            batched = asyncio.run(_concurrent(service.base_url, payloads, timeout=120))
            batched_wall = time.perf_counter() - start
            solo = []
            for image, phrase in payloads:
                reply = client.post(
                    "/ground", files={"image": ("scene.png", image, "image/png")}, data=_ground_fields(phrase)
                )
                solo.append({"status": reply.status_code, "body": reply.json()})
            hits = [
                bool(r["body"].get("boxes")) and iou(r["body"]["boxes"][0]["xyxy"], item.box) >= 0.5
                for r, item in zip(batched, items, strict=True)
            ]
            equal = [
                b["status"] == s["status"] == 200
                and b["body"].get("raw_output") == s["body"].get("raw_output")
                for b, s in zip(batched, solo, strict=True)
            ]
            latencies = sorted(r["seconds"] for r in batched)
            result["concurrent"] = {
                "requests": CONCURRENT,
                "statuses": sorted({r["status"] for r in batched}),
                "all_200": all(r["status"] == 200 for r in batched),
                "wall_s": batched_wall,
                "p50_s": latencies[len(latencies) // 2],
                "max_s": latencies[-1],
                "batch_sizes": sorted({r["body"].get("batch_size") for r in batched if r["status"] == 200}),
                "acc_at_0_5": sum(hits) / len(hits),
                "batched_equals_solo": sum(equal),
                "differing": [
                    {"i": i, "batched": b["body"].get("raw_output"), "solo": s["body"].get("raw_output")}
                    for i, (b, s, same) in enumerate(zip(batched, solo, equal, strict=True))
                    if not same
                ][:8],
            }
            size = image_size_for(12.8)
            buffer = io.BytesIO()
            scene(size).save(buffer, format="JPEG", quality=90)
            start = time.perf_counter()
            big = client.post(
                "/ground",
                files={"image": ("big.jpg", buffer.getvalue(), "image/jpeg")},
                data=_ground_fields("the red circle"),
            )
            result["large"] = {
                "image_size": list(size),
                "bytes": len(buffer.getvalue()),
                "status": big.status_code,
                "seconds": time.perf_counter() - start,
                "model_input_size": big.json().get("model_input_size"),
                "error": big.json().get("error"),
            }
    finally:
        result["exit_code"] = service.stop()
        result["log_tail"] = service.log_tail(2000)
    result["ok"] = bool(
        result.get("readme", {}).get("status") == 200
        and result.get("concurrent", {}).get("all_200")
        and result.get("large", {}).get("status") == 200
        and result["exit_code"] == 0
    )
    return result


# ---------------------------------------------------------------------------------------------------- speed
def _run_module(module: str, arguments: list[str], timeout_s: float) -> dict:
    start = time.perf_counter()
    command = [sys.executable, "-m", module, *arguments]
    try:
        child = subprocess.run(
            command,
            cwd=REPO,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        return {
            "command": " ".join(command[1:]),
            "returncode": child.returncode,
            "seconds": time.perf_counter() - start,
            "stderr_tail": child.stderr[-3000:],
        }
    except subprocess.TimeoutExpired as expired:
        stderr = (
            expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else expired.stderr
        )
        return {
            "command": " ".join(command[1:]),
            "returncode": None,
            "timed_out_after_s": timeout_s,
            "seconds": time.perf_counter() - start,
            "stderr_tail": (stderr or "")[-3000:],
        }


def step_speed(args: argparse.Namespace) -> dict:
    from bench.shapes import SHAPES

    per_shape = args.speed_budget_s / max(1, len(SHAPES))
    runs = []
    for shape in SHAPES:
        out = args.results / f"gpu_model_speed_{shape}{args.suffix}.json"
        arguments = [
            "--device",
            args.device,
            "--models",
            shape,
            "--methods",
            "none",
            "nuwa",
            "fastv",
            "--budgets",
            *_token_budgets(shape),
            "--batch-sizes",
            *(["1", "2"] if args.dry_run else ["1", "8"]),
            "--repeats",
            "1" if args.dry_run else "2",
            "--new-tokens",
            "8",
            "--out",
            str(out),
        ]
        if args.dry_run:
            arguments.append("--smoke")
        run = _run_module("bench.model_speed", arguments, per_shape)
        run["shape"] = shape
        if run["returncode"] == 0 and out.is_file():
            document = json.loads(out.read_text())
            run["models"] = document.get("models")
            run["rows"] = [
                {
                    key: row[key]
                    for key in (
                        "method",
                        "budget",
                        "batch_size",
                        "stage1_tokens",
                        "average_tokens",
                        "vision_ms",
                        "prefill_ms",
                        "decode_ms",
                        "ttft_ms",
                        "peak_memory_mib",
                    )
                }
                for row in document["rows"]
            ]
        runs.append(run)
    return {"runs": runs, "ok": all(run["returncode"] == 0 for run in runs)}


# ---------------------------------------------------------------------------------------------------- memory
def step_memory(args: argparse.Namespace) -> dict:
    out = args.results / f"gpu_vision_memory{args.suffix}.json"
    arguments = ["--device", args.device, "--in-process", "--label", "gpu", "--out", str(out)]
    if args.dry_run:
        arguments += ["--smoke", "--megapixels", "0.5", "2"]
    else:
        arguments += ["--qwen-depth", "32", "--megapixels", "0.5", "2", "4", "12.8"]
    run = _run_module("bench.vision_memory", arguments, args.memory_budget_s)
    if run["returncode"] == 0 and out.is_file():
        from bench.vision_memory import summarise

        run["summary"] = summarise(json.loads(out.read_text())["rows"])
    run["ok"] = run["returncode"] == 0
    return run


# ---------------------------------------------------------------------------------------------------- decode
def step_decode(args: argparse.Namespace) -> dict:
    from bench.shapes import SHAPES

    out = args.results / f"gpu_decode_step{args.suffix}.json"
    arguments = ["--device", args.device, "--families", *SHAPES, "--batch-sizes", "1", "8", "--out", str(out)]
    arguments += ["--smoke", "--repeats", "2", "--steps", "3"] if args.dry_run else ["--repeats", "3"]
    run = _run_module("bench.decode_step", [*arguments, "--no-quiet-wait"], args.decode_budget_s)
    if run["returncode"] == 0 and out.is_file():
        run["rows"] = {
            name: {key: row[key] for key in ("stock_ms_per_step", "fast_ms_per_step", "fast_over_stock")}
            | {"exact": row["logits_equal_every_step"]}
            for name, row in json.loads(out.read_text())["results"].items()
        }
    run["ok"] = run["returncode"] == 0
    return run


# ---------------------------------------------------------------------------------------------------- summary
def summary_table(results: dict) -> str:
    lines = ["| step | ok | seconds | result |", "| --- | --- | --- | --- |"]
    service = results.get("service", {})
    if service:
        readme, conc, large = (
            service.get("readme", {}),
            service.get("concurrent", {}),
            service.get("large", {}),
        )
        lines.append(
            f"| service: README request | {readme.get('status') == 200} | "
            f"| box {[round(v, 2) for v in readme.get('box') or []]} "
            f"(IoU {readme.get('iou_with_target', 0):.2f} with the red circle, "
            f"{readme.get('iou_with_readme_box', 0):.2f} with README's box) |"
        )
        lines.append(
            f"| service: {CONCURRENT} concurrent | {conc.get('all_200')} | {conc.get('wall_s', 0):.2f} "
            f"| statuses {conc.get('statuses')}, batch sizes {conc.get('batch_sizes')}, Acc@0.5 "
            f"{conc.get('acc_at_0_5', 0):.2f}, p50 {conc.get('p50_s', 0) * 1000:.0f} ms, batched == solo "
            f"{conc.get('batched_equals_solo')}/{CONCURRENT} |"
        )
        lines.append(
            f"| service: 12.8 MP request | {large.get('status') == 200} | {large.get('seconds', 0):.2f} "
            f"| {large.get('image_size')} -> {large.get('model_input_size')}, status {large.get('status')} |"
        )
        lines.append(
            f"| service: exit | {service.get('exit_code') == 0} | | exit code {service.get('exit_code')} |"
        )
    for run in results.get("speed", {}).get("runs", []):
        rows = run.get("rows") or []
        weights = (run.get("models") or [{}])[0].get("weights_mib")
        peak = max((row["peak_memory_mib"] for row in rows), default=None)
        by_key = {(row["method"], row["budget"], row["batch_size"]): row for row in rows}
        none1 = by_key.get(("none", None, 1), {})
        best = [
            f"{row['method']}@{row['budget']:g} bs{row['batch_size']}: prefill {row['prefill_ms']:.1f} ms"
            for row in rows
            if row["method"] == "nuwa" and row["batch_size"] == 1
        ]
        lines.append(
            f"| speed: {run['shape']} | {run['returncode'] == 0} | {run['seconds']:.0f} "
            f"| weights {weights and f'{weights:,.0f}'} MiB, peak {peak and f'{peak:,.0f}'} MiB; unpruned bs1 prefill "
            f"{none1.get('prefill_ms', float('nan')):.1f} ms; {'; '.join(best)} |"
        )
    memory = results.get("memory", {})
    if memory:
        parts = [
            f"{SHORT_NAMES.get(row['model'], row['model'])} {row['megapixels']:g} MP: tower {row['tower_mib']:,.0f} MiB, "
            f"stage-1 extra {row['stage1_extra_mib']:,.0f} MiB ({row['ratio']:.2f}x)"
            for row in memory.get("summary", [])
        ]
        lines.append(
            f"| memory: vision + stage 1 | {memory.get('ok')} | {memory.get('seconds', 0):.0f} | {'; '.join(parts)} |"
        )
    decode = results.get("decode", {})
    if decode:
        parts = [
            f"{name}: {row['stock_ms_per_step']:.1f} -> {row['fast_ms_per_step']:.1f} ms/step "
            f"({row['fast_over_stock']:.2f}x{', exact' if row['exact'] else ', NOT exact'})"
            for name, row in (decode.get("rows") or {}).items()
        ]
        lines.append(
            f"| decode: stock vs fast step | {decode.get('ok')} | {decode.get('seconds', 0):.0f} | {'; '.join(parts)} |"
        )
    return "\n".join(lines)


STEPS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "service": step_service,
    "speed": step_speed,
    "memory": step_memory,
    "decode": step_decode,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, small shapes: checks the logic only")
    parser.add_argument("--device", default=None, help="default: cuda:0 (cpu with --dry-run)")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--speed-budget-s", type=float, default=170.0, help="split over the shapes")
    parser.add_argument("--memory-budget-s", type=float, default=100.0)
    parser.add_argument("--decode-budget-s", type=float, default=90.0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.device = args.device or ("cpu" if args.dry_run else "cuda:0")
    args.suffix = "_dry_run" if args.dry_run else ""
    args.results.mkdir(parents=True, exist_ok=True)
    import torch
    import transformers

    results: dict[str, Any] = {
        "dry_run": args.dry_run,
        "device": args.device,
        "environment": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }
    started = time.perf_counter()
    out = args.results / f"gpu_check{args.suffix}.json"
    for name in args.steps:
        logger.info("step %s", name)
        step_start = time.perf_counter()
        try:
            results[name] = STEPS[name](args)
        except Exception as error:  # one failed step must not lose the others' results
            logger.exception("step %s failed", name)
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        results[name]["seconds"] = results[name].get("seconds") or time.perf_counter() - step_start
        out.write_text(json.dumps(results, indent=1, default=str))
    results["wall_s"] = time.perf_counter() - started
    out.write_text(json.dumps(results, indent=1, default=str))
    print(
        f"\nGPU check{' (DRY RUN, CPU: numbers mean nothing)' if args.dry_run else ''}: {results['environment']}"
    )
    print(summary_table(results))
    print(
        f"\nwall {results['wall_s']:.0f} s; JSON: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}"
    )
    return 0 if all(results[name].get("ok") for name in args.steps) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Model speed per pruning method, budget and batch size: vision, prune, prefill, decode, TTFT, tokens/s, memory.

What is timed, per (method, budget, batch size): the engine's own stages, vision encoder -> stage-1 pruning ->
LLM prefill (stage 2 inside) -> greedy decode of a FIXED number of tokens (EOS ignored, so every configuration
decodes the same amount). On CUDA each stage is bracketed by CUDA events (read once at the end, no sync between
stages); on CPU by `time.perf_counter`. Preprocessing (resize, normalise, tokenise) is timed apart with
perf_counter: it is CPU work on either device.

Reported next to each timing: the theoretical prefill FLOPs of the engine's report (the Nüwa paper's count,
8SH^2 + 4S^2H + 4SHI per LLM layer with the real per-layer visual tokens) and the FLOPs FLOOR: those FLOPs divided
by the device's peak matmul throughput measured in the same run (float32 GEMM on CPU with the benchmark's thread
count, bf16 GEMM on CUDA). The floor is the prefill time a perfect kernel would need; measured / floor says how
far from compute-bound a configuration is.

Models: on CPU the built-in model (committed checkpoint or a random-weight one of the same shapes); on CUDA
additionally random-weight Qwen2.5-VL-7B, LLaVA-1.5-7B and Qwen3-VL-8B shapes (`bench/shapes.py`).

Usage:
    python -m bench.model_speed --out bench/results/model_speed_cpu.json            # CPU, built-in model
    python -m bench.model_speed --device cuda --models builtin llava_1_5_7b qwen2_5_vl_7b qwen3_vl_8b \\
        --out bench/results/model_speed_cuda.json                                    # GPU machine
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from models.budget import PruningConfig
from models.clocks import CudaEventClock, StageClock
from models.methods import method_names
from models.runner import ModelRunner
from models.tasks import TaskRequest

logger = logging.getLogger(__name__)

BUDGETS = (0.25, 0.5, 0.75)
BATCH_SIZES = (1, 4, 16)
PAPER = {
    "source": "Nüwa paper, LLaVA-1.5-7B on A100, 64 visual tokens vs 576",
    "prefill_ms_pruned": 46.0,
    "prefill_ms_unpruned": 124.0,
    "tflops_pruned": 0.6476,
    "tflops_unpruned": 5.973,
}


def paper_flops_check() -> dict[str, Any]:
    """The paper's LLaVA-1.5-7B TFLOPs recomputed with this repository's planner and FLOPs count (no timing).

    Llama-2-7B shape (L 32, H 4096, I 11008), 576 visual tokens, the 64-token Nüwa plan from `plan_tokens`;
    counting the visual tokens only (no text) reproduces the paper's 5.973 / 0.6476 TFLOPs, which shows both
    what the paper counted and that the planner reproduces its published configuration.
    """
    from models.budget import plan_tokens
    from models.reports import prefill_flops

    hidden, intermediate, layers, tokens = 4096, 11008, 32, 576
    plan = plan_tokens(PruningConfig(method="nuwa", budget=64), tokens, layers, (24, 24), "llava")
    return {
        "shape": "LLaVA-1.5-7B (Llama-2-7B: L 32, H 4096, I 11008), 576 visual tokens, visual tokens only",
        "plan_64": {"stage1": plan.stage1_tokens, "stage2": plan.stage2_tokens, "layer": plan.stage2_layer},
        "tflops_unpruned": prefill_flops([tokens] * layers, hidden, intermediate) / 1e12,
        "tflops_64": prefill_flops(list(plan.per_layer), hidden, intermediate) / 1e12,
    }


def timed_generate(
    runner: ModelRunner, batch: Any, configs: Sequence[PruningConfig], new_tokens: int
) -> tuple[dict[str, float], list[Any]]:
    """The engine's own `generate`, decoding exactly `new_tokens` tokens per sample (EOS ignored), so every
    configuration decodes the same number of steps; CUDA events on a GPU (no sync between stages).

    Returns:
        (seconds per stage: vision, prune, prefill, decode), the per-sample visual-token reports.
    """
    adapter = runner.adapter
    clock = CudaEventClock() if adapter.device.type == "cuda" else StageClock(adapter.device)
    output = adapter.generate(batch, configs, max_new_tokens=new_tokens, clock=clock, stop_at_eos=False)
    return dict(output.timings), output.reports


def peak_matmul_flops(device: torch.device, seconds: float = 2.0) -> dict[str, Any]:
    """Measured peak GEMM throughput of the device: float32 on CPU, bf16 on CUDA (FLOP/s, best of the runs)."""
    if device.type == "cuda":
        size, dtype = 8192, torch.bfloat16
    else:
        size, dtype = 1024, torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2.0 * size**3
    best = 0.0
    deadline = time.perf_counter() + seconds
    runs = 0
    while time.perf_counter() < deadline or runs < 3:
        if device.type == "cuda":
            start_event, end_event = (
                torch.cuda.Event(enable_timing=True),
                torch.cuda.Event(enable_timing=True),
            )
            start_event.record()
            for _ in range(10):
                torch.mm(a, b)
            end_event.record()
            torch.cuda.synchronize()
            elapsed = start_event.elapsed_time(end_event) / 1000.0 / 10
        else:
            start = time.perf_counter()
            torch.mm(a, b)
            elapsed = time.perf_counter() - start
        best = max(best, flops / elapsed)
        runs += 1
    return {"dtype": str(dtype).replace("torch.", ""), "size": size, "flops_per_s": best, "runs": runs}


@dataclass
class Row:
    """One (model, method, budget, batch) measurement; times are medians over repeats, in milliseconds."""

    model: str
    method: str
    budget: float | None
    batch_size: int
    visual_tokens: int
    stage1_tokens: float
    average_tokens: float
    preprocess_ms: float
    vision_ms: float
    prune_ms: float
    prefill_ms: float
    decode_ms: float
    ttft_ms: float
    total_ms: float
    decode_tokens_per_s: float
    e2e_tokens_per_s: float
    requests_per_s: float
    prefill_tflops: float
    prefill_tflops_unpruned: float
    flops_floor_ms: float
    peak_memory_mib: float
    repeats: int


def _images(runner: ModelRunner, batch_size: int) -> list[Image.Image]:
    """Contract scenes at the model's input size (so no padding or resize changes the token count)."""
    import random

    from models.builtin.scenes import make_grounding_item, render

    side = {"qwen2_5_vl": 672, "qwen3_vl": 768}.get(runner.adapter.family, 336)  # 576 tokens each
    return [render(make_grounding_item(random.Random(i), side).scene) for i in range(batch_size)]


def measure(
    runner: ModelRunner,
    method: str,
    budget: float | None,
    batch_size: int,
    new_tokens: int,
    repeats: int,
    peak_flops: float,
) -> Row:
    """Median stage timings of `repeats` runs (after one warm-up run) of one configuration."""
    device = runner.adapter.device
    images = _images(runner, batch_size)
    prompts = [runner.prompt_for(TaskRequest(image=None, kind="ground", text="the red circle"))] * batch_size
    configs = [PruningConfig(method=method, budget=budget)] * batch_size  # type: ignore[arg-type]
    samples: list[dict[str, float]] = []
    reports: list[Any] = []
    peak_mib = 0.0
    for attempt in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        batch = runner.adapter.prepare(images, prompts)
        preprocess = time.perf_counter() - start
        stages, reports = timed_generate(runner, batch, configs, new_tokens)
        if device.type == "cuda":
            peak_mib = max(peak_mib, torch.cuda.max_memory_allocated(device) / 2**20)
        if attempt > 0:  # the first run warms caches and kernels
            samples.append({"preprocess": preprocess, **stages})
    if device.type != "cuda":  # process high-water mark (monotone): only its maximum over rows means anything
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def median(stage: str) -> float:
        return statistics.median(sample.get(stage, 0.0) for sample in samples)

    pre, vision, prune, prefill, decode = (
        median(s) for s in ("preprocess", "vision", "prune", "prefill", "decode")
    )
    ttft = pre + vision + prune + prefill
    total = ttft + decode
    flops = sum(report.flops_prefill for report in reports)
    flops_unpruned = sum(report.flops_prefill_unpruned for report in reports)
    return Row(
        model=runner.name,
        method=method,
        budget=budget,
        batch_size=batch_size,
        visual_tokens=reports[0].original,
        stage1_tokens=statistics.fmean(report.stage1 for report in reports),
        average_tokens=statistics.fmean(report.average for report in reports),
        preprocess_ms=pre * 1000,
        vision_ms=vision * 1000,
        prune_ms=prune * 1000,
        prefill_ms=prefill * 1000,
        decode_ms=decode * 1000,
        ttft_ms=ttft * 1000,
        total_ms=total * 1000,
        decode_tokens_per_s=batch_size * (new_tokens - 1) / decode if decode > 0 else 0.0,
        e2e_tokens_per_s=batch_size * new_tokens / total,
        requests_per_s=batch_size / total,
        prefill_tflops=flops / batch_size / 1e12,
        prefill_tflops_unpruned=flops_unpruned / batch_size / 1e12,
        flops_floor_ms=flops / peak_flops * 1000,
        peak_memory_mib=peak_mib,
        repeats=repeats,
    )


def load_model(name: str, device: torch.device, smoke: bool) -> ModelRunner:
    """`builtin` (committed or random-weight built-in model) or a random-weight 7B shape."""
    if name == "builtin":
        from bench.server import default_model_dir
        from models.loading import load_runner

        runner = load_runner(default_model_dir(), device=str(device))
        runner.name = "builtin (nuwa-tiny-llava)"
        return runner
    from bench.shapes import build_shape

    return build_shape(name, device, smoke=smoke)


def model_memory(runner: ModelRunner) -> dict[str, Any]:
    """Parameter count, dtype and (CUDA) the memory the loaded weights hold, next to each row's peak."""
    model = runner.adapter.model
    first = next(model.parameters())
    weights_mib = None
    if first.device.type == "cuda":
        torch.cuda.synchronize(first.device)
        weights_mib = torch.cuda.memory_allocated(first.device) / 2**20
    return {
        "model": runner.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(first.dtype).replace("torch.", ""),
        "weights_mib": weights_mib,
    }


def grid(
    methods: Sequence[str], budgets: Sequence[float], batch_sizes: Sequence[int]
) -> list[tuple[str, float | None, int]]:
    """Unpruned once per batch size, then every other method at every budget."""
    rows: list[tuple[str, float | None, int]] = []
    for batch_size in batch_sizes:
        if "none" in methods:
            rows.append(("none", None, batch_size))
        for method in methods:
            if method != "none":
                rows.extend((method, budget, batch_size) for budget in budgets)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time vision / prune / prefill / decode per pruning config.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--models", nargs="+", default=None, help="builtin, llava_1_5_7b, qwen2_5_vl_7b, qwen3_vl_8b"
    )
    parser.add_argument("--methods", nargs="+", default=list(method_names()))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES))
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--smoke", action="store_true", help="shrunken 7B shapes (checks the code path only)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    models = args.models or (
        ["builtin", "llava_1_5_7b", "qwen2_5_vl_7b", "qwen3_vl_8b"] if device.type == "cuda" else ["builtin"]
    )
    peak = peak_matmul_flops(device)
    logger.info("peak %s GEMM: %.1f GFLOP/s", peak["dtype"], peak["flops_per_s"] / 1e9)
    rows: list[Row] = []
    loaded: list[dict[str, Any]] = []
    started = time.perf_counter()
    for name in models:
        runner = load_model(name, device, args.smoke)
        loaded.append(model_memory(runner))
        for method, budget, batch_size in grid(args.methods, args.budgets, args.batch_sizes):
            row = measure(
                runner, method, budget, batch_size, args.new_tokens, args.repeats, peak["flops_per_s"]
            )
            rows.append(row)
            logger.info(
                "%s %s %s bs=%d: vision %.1f prune %.1f prefill %.1f decode %.1f ms (floor %.2f ms)",
                row.model,
                method,
                budget,
                batch_size,
                row.vision_ms,
                row.prune_ms,
                row.prefill_ms,
                row.decode_ms,
                row.flops_floor_ms,
            )
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "peak_matmul": peak,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "smoke": args.smoke,
        "wall_s": time.perf_counter() - started,
        "paper": PAPER,
        "paper_flops_check": paper_flops_check(),
        "models": loaded,
        "rows": [asdict(row) for row in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    logger.info("wrote %d rows to %s in %.0f s", len(rows), args.out, result["wall_s"])


if __name__ == "__main__":
    main()

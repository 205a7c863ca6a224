"""One cached decode step: the stock forward (`models.decoding.decode_step`) vs the fast step (`models.fast_decode`).

Why a benchmark of its own: the fast step covers three families (LLaVA's Llama, Qwen2.5-VL's and dense Qwen3-VL's
text models), and what it removes is per-step Python, not arithmetic. On a CPU it is timed where Python is what a
step costs: the built-in checkpoint, and the 7B/8B shapes of `bench.shapes` at their smoke widths (`--smoke`:
4 layers, hidden 64), the regime of a GPU step at batch 1, where kernels are short and the host sets the pace. On
a GPU (`--device cuda:0`, bf16) it times the real shapes; `bench/gpu_check.sh` runs it so.

Same process, same prefill, the two paths alternated block by block (`--steps` steps each, median of
`--repeats`); every step's logits are compared, so each row also says whether the fast path was exact.

Usage: ``python -m bench.decode_step --smoke --out bench/results/decode_step.json``
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

from bench.quiet import start_in_process_benchmark

logger = logging.getLogger(__name__)

FAMILIES = ("builtin", "llava_1_5_7b", "qwen2_5_vl_7b", "qwen3_vl_8b")
IMAGE_SIDES = {"llava_1_5_7b": 336, "qwen2_5_vl_7b": 672, "qwen3_vl_8b": 768}  # 576 visual tokens each
PROMPT = "Locate the red circle in the image."


def _adapter(family: str, device: torch.device, smoke: bool) -> Any:
    """The engine adapter of one family, fast paths on (they fuse weights and build the fast step at start)."""
    if family == "builtin":
        from models.builtin import BUILTIN_MODEL_DIR
        from models.loading import load_runner

        return load_runner(BUILTIN_MODEL_DIR, str(device)).adapter
    from bench.shapes import build_shape

    return build_shape(family, device, smoke=smoke).adapter


def _row_name(family: str, smoke: bool, batch_size: int) -> str:
    return f"{family}{' (smoke)' if smoke and family != 'builtin' else ''} batch {batch_size}"


def _images(count: int, side: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


@torch.inference_mode()
def _time_steps(adapter: Any, side: int, batch_size: int, steps: int, repeats: int) -> dict[str, Any]:
    """Median ms per step of each path and whether their logits were equal at every step."""
    from models.budget import PruningConfig
    from models.decoding import decode_step
    from models.fast_decode import KVBuffers

    fast = adapter.fast_decode_step
    device = adapter.model.device
    batch = adapter.prepare(_images(batch_size, side), [PROMPT] * batch_size)
    llm = adapter.prune(batch, [PruningConfig(method="none")] * batch_size)
    cache = DynamicCache(config=adapter.model.config.text_config)
    try:
        first = adapter.run_llm(llm, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1)[:, None]
        adapter.controller.end_prefill()
        times: dict[str, list[float]] = {"stock": [], "fast": []}
        exact = True

        def run(name: str, step: Callable[[torch.Tensor, Any], torch.Tensor], kv: Any) -> list[torch.Tensor]:
            generated, logits = first, []
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                out = step(generated, kv)
                logits.append(out)
                generated = torch.cat([generated, out.argmax(-1)[:, None]], dim=1)
            _synchronize(device)
            times[name].append((time.perf_counter() - start) * 1000 / steps)
            return logits

        def stock(generated: torch.Tensor, kv: Any) -> torch.Tensor:
            return decode_step(adapter.model, llm, generated, kv).logits[:, -1]

        def ours(generated: torch.Tensor, kv: Any) -> torch.Tensor:
            return fast(llm, generated, kv, adapter.controller.decode_key_valid)

        for repeat in range(repeats + 1):  # the first round warms both paths up and is not counted
            order = [("stock", stock), ("fast", ours)]
            results = {}
            for name, step in order if repeat % 2 else order[::-1]:
                kv = copy.deepcopy(cache) if name == "stock" else KVBuffers(copy.deepcopy(cache), extra=steps)
                results[name] = run(name, step, kv)
            exact = exact and all(
                torch.equal(a, b) for a, b in zip(results["stock"], results["fast"], strict=True)
            )
    finally:
        adapter.controller.finish()
    stock_ms, fast_ms = statistics.median(times["stock"][1:]), statistics.median(times["fast"][1:])
    return {
        "stock_ms_per_step": round(stock_ms, 3),
        "fast_ms_per_step": round(fast_ms, 3),
        "fast_over_stock": round(fast_ms / stock_ms, 3),
        "logits_equal_every_step": exact,
        "prompt_tokens": int(llm.input_ids.shape[1]),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Stock decode step vs the fast step, alternated in one process."
    )
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--smoke", action="store_true", help="the 7B/8B shapes at small widths (CPU)")
    parser.add_argument("--device", default="cpu", help='"cpu" or "cuda:N" (the shapes run in bf16 there)')
    parser.add_argument("--steps", type=int, default=8)
    args, loads = start_in_process_benchmark(parser, argv, repeats=15)
    device = torch.device(args.device)
    results: dict[str, Any] = {}
    for family in args.families:
        adapter = _adapter(family, device, args.smoke)
        if adapter.fast_decode_step is None:
            raise SystemExit(f"{family}: no fast decode step for this model")
        side = 336 if family == "builtin" else 112 if args.smoke else IMAGE_SIDES[family]
        for batch_size in args.batch_sizes:
            key = _row_name(family, args.smoke, batch_size)
            loads.before(key)
            results[key] = _time_steps(adapter, side, batch_size, args.steps, args.repeats)
            loads.after(key)
            results[key]["load"] = loads.runs[key]
            logger.info("%s: %s", key, results[key])
        del adapter
        if device.type == "cuda":
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "device": args.device,
        "smoke": args.smoke,
        "threads": args.threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "results": results,
    }
    args.out.write_text(json.dumps({**summary, "load_average": loads.to_json()}, indent=1))


if __name__ == "__main__":
    main()

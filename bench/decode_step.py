"""One cached decode step: the stock forward (`models.decoding.decode_step`) vs the fast step (`models.fast_decode`).

Why a benchmark of its own: the fast step now covers three families (LLaVA's Llama, Qwen2.5-VL's and dense
Qwen3-VL's text models), and what it removes is per-step Python, not arithmetic. So it is timed where Python is
what a step costs: the built-in checkpoint and the Qwen families at the smoke widths of `bench.shapes` (4 layers,
hidden 64), the regime of a GPU step at batch 1, where kernels are short and the host's Python sets the pace. On a
CPU at real widths the products dominate and both paths take the same time.

Same process, same prefill, the two paths alternated step block by step block (`--steps` steps each, median of
`--repeats`); every step's logits are compared, so the row says whether the fast path was also exact.

Usage: ``python -m bench.decode_step --out bench/results/decode_step.json``
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

from bench.quiet import start_benchmark

logger = logging.getLogger(__name__)

FAMILIES = ("builtin", "qwen2_5_vl_smoke", "qwen3_vl_smoke")
PROMPT = "Locate the red circle in the image."


def _adapter(family: str) -> Any:
    """The engine adapter of one family, fast paths on (they fuse weights and build the fast step at start)."""
    from bench import shapes
    from models.qwen2_5_vl import Qwen2_5_VLAdapter
    from models.qwen3_vl import Qwen3VLAdapter

    cpu = torch.device("cpu")
    if family == "builtin":
        from models.builtin import BUILTIN_MODEL_DIR
        from models.loading import load_runner

        return load_runner(BUILTIN_MODEL_DIR, "cpu").adapter
    if family == "qwen2_5_vl_smoke":
        return Qwen2_5_VLAdapter(*shapes.build_qwen2_5_vl_7b(cpu, torch.float32, smoke=True))
    if family == "qwen3_vl_smoke":
        return Qwen3VLAdapter(*shapes.build_qwen3_vl_8b(cpu, torch.float32, smoke=True))
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def _images(count: int, side: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


@torch.inference_mode()
def _time_steps(adapter: Any, batch_size: int, steps: int, repeats: int) -> dict[str, Any]:
    """Median ms per step of each path and whether their logits were equal at every step."""
    from models.budget import PruningConfig
    from models.decoding import decode_step
    from models.fast_decode import KVBuffers

    fast = adapter.fast_decode_step
    side = 336 if adapter.family == "llava" else 112
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
            start = time.perf_counter()
            for _ in range(steps):
                out = step(generated, kv)
                logits.append(out)
                generated = torch.cat([generated, out.argmax(-1)[:, None]], dim=1)
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
            if repeat == 0:
                times = {"stock": [], "fast": []}
    finally:
        adapter.controller.finish()
    stock_ms, fast_ms = statistics.median(times["stock"]), statistics.median(times["fast"])
    return {
        "stock_ms_per_step": round(stock_ms, 3),
        "fast_ms_per_step": round(fast_ms, 3),
        "fast_over_stock": round(fast_ms / stock_ms, 3),
        "logits_equal_every_step": exact,
        "prompt_tokens": int(llm.input_ids.shape[1]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Stock decode step vs the fast step, alternated in one process."
    )
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args, loads = start_benchmark(parser, argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    for family in args.families:
        adapter = _adapter(family)
        if adapter.fast_decode_step is None:
            raise SystemExit(f"{family}: no fast decode step for this model")
        for batch_size in args.batch_sizes:
            key = f"{family} batch {batch_size}"
            loads.before(key)
            results[key] = _time_steps(adapter, batch_size, args.steps, args.repeats)
            loads.after(key)
            results[key]["load"] = loads.runs[key]
            logger.info("%s: %s", key, results[key])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"threads": args.threads, "steps": args.steps, "repeats": args.repeats, "results": results}
    args.out.write_text(json.dumps({**summary, "load_average": loads.to_json()}, indent=1))


if __name__ == "__main__":
    main()

"""`bench/decode_step.py` runs and finds the fast step exact on the Qwen shapes the GPU check times.

The smoke shapes of `bench.shapes` are the real configs (M-RoPE sections, biases, q/k norms, DeepStack) at small
widths: the same code path the 7B/8B runs take on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import decode_step


def test_the_decode_step_benchmark_times_both_paths_and_finds_them_equal(tmp_path: Path) -> None:
    out = tmp_path / "decode_step.json"
    decode_step.main(
        [
            "--families",
            "qwen2_5_vl_smoke",
            "qwen3_vl_smoke",
            "--batch-sizes",
            "1",
            "3",
            "--steps",
            "3",
            "--repeats",
            "1",
            "--no-quiet-wait",
            "--out",
            str(out),
        ]
    )
    results = json.loads(out.read_text())["results"]
    assert set(results) == {f"{f} batch {b}" for f in ("qwen2_5_vl_smoke", "qwen3_vl_smoke") for b in (1, 3)}
    for row in results.values():
        assert row["logits_equal_every_step"] is True
        assert row["stock_ms_per_step"] > 0 and row["fast_ms_per_step"] > 0
        ratio = row["fast_ms_per_step"] / row["stock_ms_per_step"]  # of the rounded medians: close, not equal
        assert abs(row["fast_over_stock"] - ratio) < 0.01

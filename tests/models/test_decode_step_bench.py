"""`bench/decode_step.py` runs and finds the fast step exact on the 7B/8B shapes the GPU check times.

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
            "llava_1_5_7b",
            "qwen2_5_vl_7b",
            "qwen3_vl_8b",
            "--smoke",
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
    shapes = ("llava_1_5_7b", "qwen2_5_vl_7b", "qwen3_vl_8b")
    assert set(results) == {f"{shape} (smoke) batch {b}" for shape in shapes for b in (1, 3)}
    for row in results.values():
        assert row["logits_equal_every_step"] is True
        assert row["stock_ms_per_step"] > 0 and row["fast_ms_per_step"] > 0
        ratio = row["fast_ms_per_step"] / row["stock_ms_per_step"]  # of the rounded medians: close, not equal
        assert abs(row["fast_over_stock"] - ratio) < 0.01


def test_the_gpu_checks_decode_step_runs_it_and_summarises_every_row(tmp_path: Path, capsys) -> None:
    """`bench/gpu_check.sh`'s `decode` step, dry run (CPU, smoke shapes): the one GPU call must not be spent
    debugging it."""
    from bench import gpu_check

    assert gpu_check.main(["--dry-run", "--steps", "decode", "--results", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    rows = report["decode"]["rows"]
    assert len(rows) == 6 and all(row["exact"] for row in rows.values())
    table = capsys.readouterr().out
    assert "| decode: stock vs fast step | True |" in table and "qwen3_vl_8b (smoke) batch 8" in table

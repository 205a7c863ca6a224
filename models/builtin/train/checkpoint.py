"""Run directory files: the loadable checkpoint, the trainer state for an exact resume, the metrics log."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration, ProcessorMixin

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"


def load_model_dir(path: Path) -> Path:
    """`path` itself, or its `checkpoint/` when `path` is a run directory."""
    return path / CHECKPOINT if (path / CHECKPOINT / "config.json").exists() else path


def save_checkpoint(
    out: Path,
    model: LlavaForConditionalGeneration,
    processor: ProcessorMixin,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    args: argparse.Namespace,
    patch_head: torch.nn.Module,
    phrase_head: torch.nn.Module | None = None,
) -> None:
    """Write checkpoint/ and trainer_state.pt through temporary names, so a kill never leaves half a file."""
    tmp_dir = out / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir)
    processor.save_pretrained(tmp_dir)
    state = {
        "step": step,
        "stage": args.stage,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "optimizer": optimizer.state_dict(),
        "patch_head": patch_head.state_dict(),
        "phrase_head": None if phrase_head is None else phrase_head.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python_rng": random.getstate(),
    }
    torch.save(state, out / f"{STATE_FILE}.tmp")
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    os.replace(tmp_dir, out / CHECKPOINT)
    os.replace(out / f"{STATE_FILE}.tmp", out / STATE_FILE)


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    with (out / METRICS_FILE).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


__all__ = ["CHECKPOINT", "METRICS_FILE", "STATE_FILE", "append_metrics", "load_model_dir", "save_checkpoint"]

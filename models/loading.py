"""Load a model directory (the built-in model, or a local Qwen3-VL / Qwen2.5-VL / LLaVA-1.5 checkpoint) into a runner.

This is the only entry point the serving worker uses. Nothing is downloaded: every path is a local directory, and
`HF_HUB_OFFLINE=1` is set before transformers looks at it. The family is read from the directory's `config.json`
(`model_type`), so one setting (`NUWA_MODEL`) serves any supported checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from models.builtin import BUILTIN_ALIASES, BUILTIN_MODEL_DIR
from models.engine import VisionLanguageAdapter
from models.plans import PlanTable
from models.runner import ModelRunner

logger = logging.getLogger(__name__)


MODEL_TYPES = ("llava", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
"""Every `config.json` `model_type` that `load_runner` serves (the built-in model is a `llava`)."""


def resolve_model_dir(model: str | os.PathLike[str]) -> Path:
    """`builtin` (or empty) -> the committed built-in model; anything else must be an existing local directory."""
    if str(model).strip().lower() in BUILTIN_ALIASES:
        return BUILTIN_MODEL_DIR
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {str(path)!r} has no config.json (expected a local checkpoint)"
        )
    return path


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_runner(
    model_dir: str | os.PathLike[str] = "builtin", device: str = "auto", fast_paths: bool = True
) -> ModelRunner:
    """Load the model + processor from a local directory and wrap them for serving.

    Args:
        model_dir: `builtin` or a local checkpoint directory (Qwen3-VL dense or MoE, Qwen2.5-VL or LLaVA-1.5).
        device: `auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:1`, ...
        fast_paths: The adapter's serving-path equivalences (`VisionLanguageAdapter.fast_paths`).

    Returns:
        A `ModelRunner` whose `run(tasks)` executes batched, per-request pruned generation, with the calibrated
        plans of the directory's `pruning_plans.json` when it has one (`models/plans.py`).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoProcessor

    path = resolve_model_dir(model_dir)
    target = resolve_device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in MODEL_TYPES:  # say so before transformers fails on an architecture it does not know
        raise ValueError(
            f"unsupported model_type {model_type!r} in {path}; supported: {', '.join(MODEL_TYPES)}"
        )
    AutoConfig.from_pretrained(path)  # validates the config as transformers reads it
    adapter: VisionLanguageAdapter
    if model_type == "llava":
        from transformers import LlavaForConditionalGeneration

        from models.llava import LlavaAdapter

        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(path)
        adapter = LlavaAdapter(model.to(target).eval(), processor, fast_paths)
    elif model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        from models.qwen2_5_vl import Qwen2_5_VLAdapter, Qwen2_5_VLImageOnlyProcessor

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
        processor = Qwen2_5_VLImageOnlyProcessor.from_pretrained(path)
        adapter = Qwen2_5_VLAdapter(model.to(target).eval(), processor, fast_paths)
    elif model_type in ("qwen3_vl", "qwen3_vl_moe"):  # dense and MoE: one adapter
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

        from models.qwen3_vl import Qwen3VLAdapter, Qwen3VLImageOnlyProcessor

        moe = model_type == "qwen3_vl_moe"
        model_class = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
        model = model_class.from_pretrained(path, dtype=dtype)
        processor = Qwen3VLImageOnlyProcessor.from_pretrained(path)
        adapter = Qwen3VLAdapter(model.to(target).eval(), processor, fast_paths)
    else:
        raise ValueError(
            f"unsupported model_type {model_type!r} in {path}; supported: {', '.join(MODEL_TYPES)}"
        )
    plans = PlanTable.for_model(path)
    logger.info(
        "loaded %s (%s) on %s, %d calibrated plans, fast paths %s",
        path.name,
        model_type,
        target,
        len(plans),
        "on" if fast_paths else "off",
    )
    if adapter.fast_decode_step is not None:  # the last-layer shortcut's family: did its probe pass?
        rows = adapter.last_rows
        logger.info(
            "prefill's last layer: %s",
            f"o_proj and MLP on the last positions (at least {rows.min_rows} rows)"
            if rows is not None
            else "whole (no row count gave the full product's rows exactly on this device)",
        )
    return ModelRunner(adapter, name=path.name, plans=plans)


__all__ = ["MODEL_TYPES", "load_runner", "resolve_device", "resolve_model_dir"]

"""The built-in model: a tiny LLaVA-1.5 (stock transformers classes) trained here on synthetic scenes, and how it
is made. The engine never imports this package's code; it loads the committed model directory like any LLaVA
checkpoint. Nothing here is needed to serve a model (the Docker image copies only the model directory).

* `scenes`: the scene contract (`shared/specs/scenes.md`): rendering, phrases, questions, the evaluation set.
* `tokenizer`: offline byte-level BPE with `<image>` and the 1000 `<loc_k>` location tokens, LLaVA chat template.
* `build`: `build_builtin(out_dir)` makes the model directory (config, random weights, processor).
* `data`: fast training batches drawn straight from `scenes` (no per-sample processor calls).
* `train`: the training CLI (`python -m models.builtin.train`), split into heads, losses, loop, checkpoints.
* `diagnose`, `training_curve`: what a trained checkpoint gets wrong, and its learning curve.

This module itself imports nothing heavy: the service reads `BUILTIN_MODEL_DIR` from here without torch.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_MODEL_DIR = Path(__file__).resolve().parent / "nuwa-tiny-llava"
"""The committed built-in model directory (the default `NUWA_MODEL`)."""

BUILTIN_ALIASES = frozenset({"builtin", "built-in", "nuwa-tiny-llava", ""})
"""Names that mean the built-in model wherever a model directory is asked for."""

__all__ = ["BUILTIN_ALIASES", "BUILTIN_MODEL_DIR"]

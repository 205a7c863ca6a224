"""The committed built-in model: loads offline and does not regress below what docs/MODEL.md records.

The numbers come from the `regression-guard` line of docs/MODEL.md (measured, unpruned, on the first 100 grounding
+ 100 VQA items of the seeded evaluation set); this test fails if the model scores more than 5 points below them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from models.budget import PruningConfig
from models.builtin import BUILTIN_MODEL_DIR
from models.eval import evaluate, scene_items
from models.loading import load_runner

torch.set_num_threads(1)

MODEL_CARD = Path(__file__).resolve().parents[2] / "docs" / "MODEL.md"
GUARD = re.compile(r"regression-guard: grounding=([0-9.]+) vqa=([0-9.]+) n=(\d+)")
TOLERANCE = 0.05


def test_committed_checkpoint_is_small_and_complete():
    files = {path.name for path in BUILTIN_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= files
    assert (BUILTIN_MODEL_DIR / "model.safetensors").stat().st_size <= 40 * 1024 * 1024


def test_committed_checkpoint_does_not_regress():
    match = GUARD.search(MODEL_CARD.read_text())
    assert match, "docs/MODEL.md must carry a 'regression-guard: grounding=.. vqa=.. n=..' line"
    grounding, vqa, count = float(match[1]), float(match[2]), int(match[3])
    runner = load_runner("builtin", device="cpu")
    assert runner.box_format == "loc_tokens"
    score = evaluate(runner, scene_items(count), "none", PruningConfig(method="none"), batch_size=25)
    assert score.grounding_total == count and score.vqa_total == count
    assert score.grounding >= grounding - TOLERANCE, (score.grounding, grounding)
    assert score.vqa >= vqa - TOLERANCE, (score.vqa, vqa)

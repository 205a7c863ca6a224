"""The retention study: every pruning method at several budgets vs the unpruned model, on grounding and VQA.

This is the paper's central claim measured on our own stack. Existing pruners keep VQA accuracy but lose grounding;
Nüwa keeps both. For every (method, budget) the study reports:
- VQA exact match and grounding Acc@0.5;
- retention, as a percentage of the unpruned model's score;
- the mean average visual tokens;
- theoretical prefill FLOPs;
- measured prefill time.

Usage:
    python -m models.eval                       # built-in model, contract scenes (1000 + 1000 items at S = 336)
    python -m models.eval --limit 100           # quick run
    python -m models.eval --stage single --out docs/RETENTION_SINGLE.md   # one-object held-out scenes
    python -m models.eval --model DIR --data items.jsonl   # a local Qwen2.5-VL / LLaVA-1.5 checkpoint, your items
    python -m models.eval --also-data runs/contract/items.jsonl   # + the independent contract scenes, own section
    python -m models.eval --calibrate          # search Nüwa's plan per task and budget -> MODEL/pruning_plans.json
    python -m models.eval --calibrate --model DIR --data calib.jsonl   # the same on your model and your items

`--data` is JSON Lines, one item per line, image paths relative to the file:
    {"type": "ground", "image": "img/1.jpg", "phrase": "the man on the left", "box": [x1, y1, x2, y2]}
    {"type": "vqa", "image": "img/2.jpg", "question": "What color is the bus?", "answer": "red"}
An optional "kind" (any string, e.g. "ground/testA") adds a per-kind table to the report; the contract scenes carry
their phrase and question kinds ("ground/extremal", "vqa/count"). Boxes are in original image pixels. Scoring:
IoU >= 0.5 with the FIRST predicted box; VQA exact match after lower-casing and stripping whitespace and one final
period.

`--calibrate` (`models/eval/calibrate.py`) scores candidate plans on a CALIBRATION split: for the built-in model
the scenes of `CALIBRATION_SEED`, never the evaluation set; with `--data`, your file (keep it apart from the items
you evaluate on). It writes the best plan per (task, budget) into the model directory's `pruning_plans.json`,
which `nuwa` then runs (`models/plans.py`); `nuwa_paper` keeps the paper's split.
"""

from models.eval.cli import main
from models.eval.items import (
    CALIBRATION_SEED,
    EvalItem,
    calibration_items,
    jsonl_items,
    scene_items,
    stage_items,
)
from models.eval.report import EvalSet, kind_table, markdown_table, plot, targets_table, verdict, write_report
from models.eval.scoring import DEFAULT_BUDGETS, Score, configurations, evaluate

__all__ = [
    "CALIBRATION_SEED",
    "DEFAULT_BUDGETS",
    "EvalItem",
    "EvalSet",
    "calibration_items",
    "Score",
    "configurations",
    "evaluate",
    "jsonl_items",
    "kind_table",
    "main",
    "markdown_table",
    "plot",
    "scene_items",
    "stage_items",
    "targets_table",
    "verdict",
    "write_report",
]

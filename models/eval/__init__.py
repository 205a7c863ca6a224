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

`--data` is JSON Lines, one item per line, image paths relative to the file:
    {"type": "ground", "image": "img/1.jpg", "phrase": "the man on the left", "box": [x1, y1, x2, y2]}
    {"type": "vqa", "image": "img/2.jpg", "question": "What color is the bus?", "answer": "red"}
An optional "kind" (any string, e.g. "ground/testA") adds a per-kind table to the report; the contract scenes carry
their phrase and question kinds ("ground/extremal", "vqa/count"). Boxes are in original image pixels. Scoring:
IoU >= 0.5 with the FIRST predicted box; VQA exact match after lower-casing and stripping whitespace and one final
period.
"""

from models.eval.cli import main
from models.eval.items import EvalItem, jsonl_items, scene_items, stage_items
from models.eval.report import kind_table, markdown_table, plot, verdict, write_report
from models.eval.scoring import DEFAULT_BUDGETS, Score, configurations, evaluate

__all__ = [
    "DEFAULT_BUDGETS",
    "EvalItem",
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
    "verdict",
    "write_report",
]

"""`python -m models.eval`: the retention study's command line and `--calibrate` (see `models/eval/__init__.py`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from models.eval.items import (
    CALIBRATION_SEED,
    EvalItem,
    calibration_items,
    jsonl_items,
    scene_items,
    stage_items,
)
from models.eval.report import EvalSet, markdown_table, plot, verdict, write_report
from models.eval.scoring import DEFAULT_BUDGETS, configurations, evaluate
from models.methods import method_names

if TYPE_CHECKING:
    from models.eval.calibrate import CalibrationResult
    from models.runner import ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_ITEMS = 256
"""Calibration items per task (grounding, VQA) of the built-in calibration split."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin", help="builtin or a local checkpoint directory")
    parser.add_argument("--data", type=Path, default=None, help="JSON Lines items (see module docstring)")
    parser.add_argument(
        "--also-data",
        type=Path,
        nargs="+",
        default=[],
        help="more JSON Lines sets, each scored and reported on its own (e.g. the contract scenes)",
    )
    parser.add_argument("--limit", type=int, default=None, help="at most this many items of each kind")
    parser.add_argument(
        "--stage",
        default=None,
        choices=("single", "color", "color_shape", "all"),
        help="held-out items of this training stage instead of the evaluation set (built-in model)",
    )
    parser.add_argument("--methods", nargs="+", default=list(method_names()), choices=method_names())
    parser.add_argument("--budgets", nargs="+", type=float, default=list(DEFAULT_BUDGETS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("docs/RETENTION.md"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    calibration = parser.add_argument_group("calibration (--calibrate)")
    calibration.add_argument(
        "--calibrate",
        action="store_true",
        help="search Nüwa's plan per task and budget and write pruning_plans.json instead of the study",
    )
    calibration.add_argument(
        "--calibration-items",
        type=int,
        default=DEFAULT_CALIBRATION_ITEMS,
        help="grounding and VQA items of the built-in calibration split (ignored with --data)",
    )
    calibration.add_argument(
        "--time-limit", type=float, default=120.0, help="minutes the whole search may take (default 120)"
    )
    calibration.add_argument("--tasks", nargs="+", default=["ground", "answer"], choices=("ground", "answer"))
    calibration.add_argument(
        "--plans", type=Path, default=None, help="plan file to write (default: MODEL/pruning_plans.json)"
    )
    calibration.add_argument(
        "--trace", type=Path, default=None, help="JSON of every candidate scored, and its plot next to it"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from models.loading import load_runner

    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m models.eval " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    runner = load_runner(args.model, device=args.device)
    if args.calibrate:
        run_calibration(args, runner, command.strip())
        return
    if args.data:
        items = jsonl_items(args.data, args.limit)
        name = str(args.data)
    elif args.stage:
        items = stage_items(args.stage, args.limit)
        name = f"held-out items of training stage {args.stage!r}"
    else:
        items = scene_items(args.limit)
        name = "evaluation set"
    sets = [(name, items)] + [(str(path), jsonl_items(path, args.limit)) for path in args.also_data]
    configs = list(configurations(args.methods, args.budgets))
    plot_path = args.plot or args.out.with_name("retention.png")
    results = []
    with tqdm(total=sum(len(s) for _, s in sets) * len(configs), unit="item", desc="retention") as progress:
        for index, (set_name, set_items) in enumerate(sets):
            scores = []
            for label, config in configs:
                progress.set_postfix_str(label)
                scores.append(evaluate(runner, set_items, label, config, args.batch_size, progress))
            path = plot_path if index == 0 else plot_path.with_name(f"{plot_path.stem}_{index + 1}.png")
            plot(scores, path)
            results.append(EvalSet(set_name, len(set_items), scores, path))
            logger.info("%s\n%s\n%s", set_name, markdown_table(scores), verdict(scores))
    write_report(results, args.out, command.strip(), runner.name, time.perf_counter() - started, runner.plans)


def run_calibration(args: argparse.Namespace, runner: ModelRunner, command: str) -> None:
    """`--calibrate`: search, merge into the model's plan file, write the trace and its plot."""
    from models.eval.calibrate import calibrate, merge_tables
    from models.eval.calibration_report import plot_trace
    from models.loading import resolve_model_dir
    from models.plans import PlanTable, plan_file

    if args.stage:
        raise SystemExit("--calibrate takes the built-in calibration split or --data, not --stage")
    items: list[EvalItem]
    if args.data:
        items = jsonl_items(args.data, args.limit)
        data = str(args.data)
    else:
        items = calibration_items(args.calibration_items)
        data = f"built-in calibration split: scenes.evaluation_set(seed={CALIBRATION_SEED}), disjoint from EVAL_SEED"
    target = plan_file(args.plans if args.plans is not None else resolve_model_dir(args.model))
    old = PlanTable.load(target) if target.is_file() else PlanTable()

    def save(result: CalibrationResult) -> PlanTable:
        """Merge into the plan file and write the trace (after every plan, so a long run keeps its work)."""
        table = merge_tables(result.table, old)
        table.save(target)
        if args.trace is not None:
            args.trace.parent.mkdir(parents=True, exist_ok=True)
            trace = {"shape": table.to_json()["shape"], "searches": result.trace}
            args.trace.write_text(json.dumps(trace, indent=1) + "\n")
            plot_trace(result.trace, table, args.trace.with_suffix(".png"))
        return table

    result = calibrate(
        runner,
        items,
        [int(b) if b > 1 else b for b in args.budgets],
        tasks=args.tasks,
        time_limit_s=60.0 * args.time_limit,
        meta={"data": data, "command": command, "model": runner.name},
        checkpoint=save,
    )
    table = save(result)
    logger.info("wrote %d plans to %s", len(table), target)
    if args.trace is not None:
        logger.info("wrote the search trace to %s and its plot next to it", args.trace)
    for plan in table.plans:
        scores = plan.scores
        logger.info(
            "%s: per layer %s, %s %.3f (paper %.3f, unpruned %.3f), %s",
            plan.label,
            list(plan.per_layer),
            scores.get("metric"),
            scores.get("calibrated", float("nan")),
            scores.get("paper", float("nan")),
            scores.get("unpruned", float("nan")),
            scores.get("stopped"),
        )


__all__ = ["DEFAULT_CALIBRATION_ITEMS", "main", "run_calibration"]

"""`python -m models.eval`: the retention study's command line (see `models/eval/__init__.py` for usage)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from models.eval.items import jsonl_items, scene_items, stage_items
from models.eval.report import markdown_table, plot, verdict, write_report
from models.eval.scoring import DEFAULT_BUDGETS, configurations, evaluate
from models.methods import method_names

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin", help="builtin or a local checkpoint directory")
    parser.add_argument("--data", type=Path, default=None, help="JSON Lines items (see module docstring)")
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from models.loading import load_runner

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runner = load_runner(args.model, device=args.device)
    if args.data:
        items = jsonl_items(args.data, args.limit)
    elif args.stage:
        items = stage_items(args.stage, args.limit)
    else:
        items = scene_items(args.limit)
    configs = list(configurations(args.methods, args.budgets))
    scores = []
    with tqdm(total=len(items) * len(configs), unit="item", desc="retention") as progress:
        for label, config in configs:
            progress.set_postfix_str(label)
            scores.append(evaluate(runner, items, label, config, args.batch_size, progress))
    plot_path = args.plot or args.out.with_name("retention.png")
    plot(scores, plot_path)
    command = "python -m models.eval " + " ".join(sys.argv[1:] if argv is None else argv)
    write_report(
        scores, args.out, plot_path, command.strip(), runner.name, time.perf_counter() - started, len(items)
    )
    logger.info("%s", markdown_table(scores))
    logger.info("%s", verdict(scores))


__all__ = ["main"]

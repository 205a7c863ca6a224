"""`python -m models.eval.coverage`: how much of each object a pruned run kept, and what that did to grounding.

Why: to tell what limits grounding at a small budget. If the answers are right whenever the target's tokens
survive and wrong when they do not, the selection is the limit (a better salience would help). If they are also
wrong when every token of the target survived, the model itself is (it was trained on all 144 tokens, and a
pruned sequence is out of its distribution).

Per item of the built-in calibration split (scene objects known), per method:
- target kept: the share of the target's cells (grid cells whose centre lies in its box) fed to the LLM (stage 1)
  and kept to the last layer (after the drop); for a VQA item the target is every object of the scene (a count
  or an "is there" question needs them all);
- objects kept: the same over every object of the scene (extremal and colour phrases need the others too).

    python -m models.eval.coverage --budget 0.25 --items 256 --threads 1
    python -m models.eval.coverage --task answer --budget 0.25 --items 256 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from models.budget import PruningConfig
from models.builtin import scenes
from models.eval.items import CALIBRATION_SEED, EvalItem
from models.eval.scoring import run_chunk
from models.runner import ModelRunner
from models.tasks import TaskResult

logger = logging.getLogger(__name__)


def object_cells(box: Sequence[float], result: TaskResult) -> set[tuple[int, int]]:
    """Grid cells (row, col) whose centre lies inside `box` (original pixels, x2/y2 exclusive)."""
    rows, cols = result.report.grid
    x1, y1, x2, y2 = result.frame.to_input_norm(tuple(map(float, box)))  # type: ignore[arg-type]
    return {
        (r, c)
        for r in range(rows)
        for c in range(cols)
        if x1 <= (c + 0.5) / cols < x2 and y1 <= (r + 0.5) / rows < y2
    }


def _share(cells: set[tuple[int, int]], kept: Iterable[tuple[int, int]]) -> float:
    return len(cells & set(kept)) / len(cells) if cells else 1.0


@dataclass
class Coverage:
    """Per-item coverage and correctness of one configuration."""

    label: str
    plans: set[str] = field(default_factory=set)
    correct: list[bool] = field(default_factory=list)
    target_stage1: list[float] = field(default_factory=list)
    target_final: list[float] = field(default_factory=list)
    objects_stage1: list[float] = field(default_factory=list)

    def accuracy_where(self, flags: list[bool]) -> tuple[float, int]:
        picked = [c for c, f in zip(self.correct, flags, strict=True) if f]
        return (sum(picked) / len(picked) if picked else float("nan")), len(picked)


def measure(
    runner: ModelRunner,
    items: Sequence[tuple[EvalItem, scenes.Scene]],
    config: PruningConfig,
    batch_size: int,
) -> Coverage:
    """Run `config` over `items` and record what each kept of its target and of every object."""
    coverage = Coverage(f"{config.method}@{config.budget:g}" if config.budget is not None else config.method)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        scored, _ = run_chunk(runner, [item for item, _ in chunk], config)
        for (item, scene), (_, result, correct) in zip(chunk, scored, strict=True):
            every = set().union(*(object_cells(o.box, result) for o in scene.objects))
            target = object_cells(item.box, result) if item.box is not None else every
            coverage.plans.add(result.report.plan)
            coverage.correct.append(correct)
            coverage.target_stage1.append(_share(target, result.report.kept_stage1))
            coverage.target_final.append(_share(target, result.report.kept))
            coverage.objects_stage1.append(_share(every, result.report.kept_stage1))
    return coverage


def table(rows: Sequence[Coverage]) -> str:
    lines = [
        "| config | plan | accuracy | target cells kept: stage 1 / last layer | all objects' cells kept (stage 1) "
        "| items with the whole target kept to the last layer | accuracy on those | accuracy on the others |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        count = len(row.correct)
        whole = [share >= 1.0 for share in row.target_final]
        kept_acc, kept_n = row.accuracy_where(whole)
        lost_acc, lost_n = row.accuracy_where([not f for f in whole])
        lines.append(
            f"| {row.label} | {', '.join(sorted(row.plans))} | {sum(row.correct) / count:.3f} | "
            f"{sum(row.target_stage1) / count:.3f} / {sum(row.target_final) / count:.3f} | "
            f"{sum(row.objects_stage1) / count:.3f} | {kept_n} of {count} | {kept_acc:.3f} | "
            f"{lost_acc:.3f} ({lost_n}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--budget", type=float, nargs="+", default=[0.25])
    parser.add_argument("--methods", nargs="+", default=["nuwa", "nuwa_paper", "nuwa_stage1", "fastv"])
    parser.add_argument("--task", choices=("ground", "answer"), default="ground")
    parser.add_argument("--items", type=int, default=256, help="items of the calibration split")
    parser.add_argument("--seed", type=int, default=CALIBRATION_SEED)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from models.loading import load_runner

    if args.threads:
        torch.set_num_threads(args.threads)
    runner = load_runner(args.model, device=args.device)
    ground = args.task == "ground"
    grounding, vqa = scenes.evaluation_set(
        num_grounding=args.items if ground else 0, num_vqa=0 if ground else args.items, seed=args.seed
    )
    items = [
        (EvalItem("ground", scenes.render(g.scene), g.phrase, box=tuple(map(float, g.box))), g.scene)
        for g in grounding
    ] + [(EvalItem("vqa", scenes.render(v.scene), v.question, answer=v.answer), v.scene) for v in vqa]
    rows = [measure(runner, items, PruningConfig(method="none"), args.batch_size)]
    for budget in args.budget:
        for method in args.methods:
            rows.append(measure(runner, items, PruningConfig(method=method, budget=budget), args.batch_size))
    sys.stdout.write(table(rows) + "\n")


if __name__ == "__main__":
    main()


__all__ = ["Coverage", "main", "measure", "object_cells", "table"]

"""Plot the built-in model's training curve from the `metrics.jsonl` files of its curriculum runs.

``python -m models.builtin.training_curve RUN_DIR [RUN_DIR ...] --out docs/model_training.png``

Each run directory is one curriculum stage (`models.builtin.train --out DIR`); they are given in training order and laid
end to end on one step axis, so the plot shows the whole curriculum. A run that was killed and resumed appends
the steps after its last checkpoint twice; the later record of a step wins, because it is the one the surviving
checkpoint continued from.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

METRICS_FILE = "metrics.jsonl"


@dataclass
class StageCurve:
    """One run's records, keyed by step (the last record of a step wins)."""

    stage: str
    train: dict[int, dict[str, Any]] = field(default_factory=dict)
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def last_step(self) -> int:
        return max([*self.train, *self.evals], default=0)


def read_run(run_dir: Path, last_step: int | None = None) -> StageCurve:
    """Parse `run_dir/metrics.jsonl` into one `StageCurve`.

    Args:
        run_dir: The run directory.
        last_step: Drop records after this step: the step whose checkpoint the next stage started from, when the
            run logged a few steps more before it was stopped.
    """
    curve = StageCurve(stage=run_dir.name)
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if last_step is not None and int(record["step"]) > last_step:
            continue
        curve.stage = record.get("stage", curve.stage)
        target = curve.evals if record.get("type") == "eval" else curve.train
        target[int(record["step"])] = record
    return curve


def plot_curves(curves: Sequence[StageCurve], out: Path) -> None:
    """Loss (top) and held-out accuracies (bottom) against the cumulative step, one shaded band per stage."""
    fig, (loss_ax, acc_ax) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True)
    offset = 0
    for index, curve in enumerate(curves):
        if index % 2:
            for ax in (loss_ax, acc_ax):
                ax.axvspan(offset, offset + curve.last_step, color="0.93", zorder=0)
        acc_ax.text(offset + 5, 1.02, curve.stage, fontsize=8, va="bottom")
        steps = sorted(curve.train)
        loss_ax.plot(
            [offset + s for s in steps], [curve.train[s]["loss"] for s in steps], color="tab:gray", lw=0.8
        )
        eval_steps = sorted(curve.evals)
        series = {
            "all/ground_acc": ("tab:blue", "-", "grounding Acc@0.5, evaluation set"),
            "all/vqa_acc": ("tab:orange", "-", "VQA, evaluation set"),
            "stage/ground_acc": ("tab:blue", ":", "grounding, current stage's items"),
            "stage/vqa_acc": ("tab:orange", ":", "VQA, current stage's items"),
        }
        for key, (colour, style, label) in series.items():
            points = [(offset + s, curve.evals[s][key]) for s in eval_steps if key in curve.evals[s]]
            if points:
                xs, ys = zip(*points, strict=True)
                acc_ax.plot(xs, ys, color=colour, ls=style, marker=".", label=label if index == 0 else None)
        offset += curve.last_step
    for target, colour in ((0.90, "tab:blue"), (0.95, "tab:orange")):
        acc_ax.axhline(target, color=colour, lw=0.6, ls="--")
    loss_ax.set_ylabel("training loss (answer + auxiliary)")
    loss_ax.set_yscale("log")
    acc_ax.set_ylabel("accuracy (unpruned)")
    acc_ax.set_ylim(0, 1.08)
    acc_ax.set_xlabel("optimizer step (stages end to end, batch 16)")
    acc_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8)
    fig.suptitle("nuwa-tiny-llava training curve (dashed: targets 0.90 grounding, 0.95 VQA)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _split_run(text: str) -> tuple[Path, int | None]:
    """ "DIR" or "DIR:STEP" -> (DIR, STEP or None)."""
    head, _, tail = text.rpartition(":")
    if head and tail.isdigit():
        return Path(head), int(tail)
    return Path(text), None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs",
        nargs="+",
        help="run directories in curriculum order, each optionally DIR:STEP to end it at the step the next began from",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/model_training.png"))
    args = parser.parse_args(argv)
    plot_curves([read_run(*_split_run(run)) for run in args.runs], args.out)
    print(args.out)  # noqa: T201  (CLI output)


if __name__ == "__main__":
    main()

"""The retention study's report: the table, the per-kind tables, the verdict, the issue-19 targets, the calibrated
plans, the plots and the Markdown file (one section per scored set)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from models.eval.scoring import Score

if TYPE_CHECKING:
    from models.plans import PlanTable

NOTES_START, NOTES_END = "<!-- notes -->", "<!-- /notes -->"
"""A hand-written block between these markers survives regenerating the report."""

TARGETS: tuple[tuple[float, float, float], ...] = ((0.25, 0.70, 0.85), (0.50, 0.95, 0.95))
"""(budget, grounding retention, VQA retention) that calibrated Nüwa must reach (issue 19) at <= the paper's FLOPs."""


@dataclass(frozen=True)
class EvalSet:
    """The scores of every configuration on one set of items, and where its plot is."""

    name: str
    items: int
    scores: Sequence[Score]
    plot_path: Path


def _retention(value: float, reference: float) -> str:
    if reference != reference or value != value or reference == 0:
        return "n/a"
    return f"{100 * value / reference:.1f}%"


def markdown_table(scores: Sequence[Score]) -> str:
    reference = scores[0]
    lines = [
        "| method | budget | plan | avg visual tokens | VQA EM | VQA retention | grounding Acc@0.5 "
        "| grounding retention | prefill GFLOPs | prefill ms/item |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for score in scores:
        budget = "100%" if score.budget is None else f"{100 * score.budget:g}%"
        lines.append(
            f"| {score.method} | {budget} | {score.plan_summary} | {score.mean_tokens:.1f} | {score.vqa:.3f} | "
            f"{_retention(score.vqa, reference.vqa)} | {score.grounding:.3f} | "
            f"{_retention(score.grounding, reference.grounding)} | {score.mean_flops / 1e9:.3f} | "
            f"{score.prefill_ms_per_item:.2f} |"
        )
    return "\n".join(lines)


def kind_table(scores: Sequence[Score], budget: float | None = None) -> str:
    """Accuracy per item kind: the unpruned model and every method at `budget` (default: the smallest; "" without
    kinds)."""
    kinds = sorted(scores[0].by_kind)
    if not kinds:
        return ""
    budgets = [s.budget for s in scores if s.budget is not None]
    chosen = budget if budget is not None else (min(budgets) if budgets else None)
    shown = [scores[0], *[s for s in scores if s.budget is not None and s.budget == chosen]]
    header = " | ".join(s.method if s.budget is None else f"{s.method} {100 * s.budget:g}%" for s in shown)
    lines = [f"| kind | items | {header} |", "|---|---|" + "---|" * len(shown)]
    for kind in kinds:
        cells = []
        for score in shown:
            correct, total = score.by_kind.get(kind, [0, 0])
            cells.append(f"{correct / total:.3f}" if total else "n/a")
        lines.append(f"| {kind} | {scores[0].by_kind[kind][1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(scores: Sequence[Score], budget: float = 0.25) -> str:
    """Does the paper's finding show? Baselines keep VQA but lose grounding; Nüwa keeps grounding."""
    reference = scores[0]
    at_budget = {s.method: s for s in scores if s.budget == budget}
    if "nuwa" not in at_budget or reference.grounding != reference.grounding or reference.grounding == 0:
        return "Not enough data for a verdict (no unpruned grounding score or no Nüwa run at this budget)."
    nuwa = at_budget["nuwa"]
    paper = at_budget.get("nuwa_paper")
    baselines = [s for m, s in at_budget.items() if m in ("fastv", "visionzip", "pooling", "random")]
    best_baseline = max(baselines, key=lambda s: s.grounding, default=None)
    parts = [
        f"At {100 * budget:g}% average visual tokens, Nüwa keeps {_retention(nuwa.grounding, reference.grounding)} "
        f"of unpruned grounding and {_retention(nuwa.vqa, reference.vqa)} of VQA (plan: {nuwa.plan_summary})."
    ]
    if paper is not None:
        parts.append(
            f"The paper's split (nuwa_paper) keeps {_retention(paper.grounding, reference.grounding)} of grounding "
            f"and {_retention(paper.vqa, reference.vqa)} of VQA."
        )
    if best_baseline is not None:
        parts.append(
            f"The best baseline for grounding ({best_baseline.method}) keeps "
            f"{_retention(best_baseline.grounding, reference.grounding)} of grounding and "
            f"{_retention(best_baseline.vqa, reference.vqa)} of VQA."
        )
        shows = nuwa.grounding > best_baseline.grounding
        parts.append(
            "The paper's finding (baselines lose grounding, Nüwa keeps it) SHOWS on this model."
            if shows
            else "The paper's finding does NOT show on this model at this budget."
        )
    return " ".join(parts)


def plot(scores: Sequence[Score], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = scores[0]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, metric, title in (
        (axes[0], "vqa", "VQA retention"),
        (axes[1], "grounding", "Grounding retention"),
    ):
        reference_value = getattr(reference, metric)
        methods = sorted({s.method for s in scores if s.budget is not None})
        for method in methods:
            points = sorted((s.budget, getattr(s, metric)) for s in scores if s.method == method)
            if reference_value and reference_value == reference_value:
                xs = [100 * b for b, _ in points]
                ys = [100 * v / reference_value for _, v in points]
                axis.plot(
                    xs,
                    ys,
                    marker="o",
                    linewidth=2.5 if method in ("nuwa", "nuwa_paper") else 1.2,
                    linestyle="--" if method == "nuwa_paper" else "-",
                    label="nuwa (calibrated)" if method == "nuwa" else method,
                )
        axis.set_title(title)
        axis.set_xlabel("average visual tokens (% of unpruned)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("% of unpruned score")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def targets_table(scores: Sequence[Score]) -> str:
    """Calibrated Nüwa against the issue-19 targets on one set ("" when nuwa or nuwa_paper was not run)."""
    reference = scores[0]
    lines = [
        "| budget | grounding retention | target | VQA retention | target | GFLOPs calibrated / paper split | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for budget, ground_target, vqa_target in TARGETS:
        found = {s.method: s for s in scores if s.budget == budget}
        if "nuwa" not in found or "nuwa_paper" not in found or not reference.grounding or not reference.vqa:
            continue
        nuwa, paper = found["nuwa"], found["nuwa_paper"]
        ground, vqa = nuwa.grounding / reference.grounding, nuwa.vqa / reference.vqa
        flops_ok = nuwa.mean_flops <= paper.mean_flops * (1 + 1e-9)
        met = ground >= ground_target and vqa >= vqa_target and flops_ok
        lines.append(
            f"| {100 * budget:g}% | {100 * ground:.1f}% | >= {100 * ground_target:g}% | {100 * vqa:.1f}% | "
            f">= {100 * vqa_target:g}% | {nuwa.mean_flops / 1e9:.3f} / {paper.mean_flops / 1e9:.3f} | "
            f"{'yes' if met else 'NO'} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def _kind_section(scores: Sequence[Score]) -> str:
    budgets = sorted({s.budget for s in scores if s.budget is not None})
    tables = [(b, kind_table(scores, b)) for b in budgets] or [(None, kind_table(scores))]
    parts = [f"Every method at {100 * b:g}%:\n\n{t}\n" if b is not None else f"{t}\n" for b, t in tables if t]
    return "\n### Per kind\n\n" + "\n".join(parts) if parts else ""


def _set_section(result: EvalSet, heading: bool) -> str:
    targets = targets_table(result.scores)
    title = f"## {result.name} ({result.items} items)\n\n" if heading else ""
    target_part = (
        "### Targets: calibrated Nüwa (`nuwa`) vs the paper's split (`nuwa_paper`)\n\n"
        "Targets (issue 19): at 25% average visual tokens >= 70% of unpruned grounding and >= 85% of VQA, at 50% "
        f">= 95% of both, prefill FLOPs no higher than the paper's split.\n\n{targets}\n\n"
        if targets
        else ""
    )
    return f"""{title}{markdown_table(result.scores)}

![retention]({result.plot_path.name})

{target_part}### Verdict

{verdict(result.scores)}
{_kind_section(result.scores)}"""


def _kept_notes(path: Path) -> str:
    if not path.is_file():
        return ""
    found = re.search(re.escape(NOTES_START) + ".*?" + re.escape(NOTES_END), path.read_text(), flags=re.S)
    return found.group(0) + "\n" if found else ""


def write_report(
    sets: Sequence[EvalSet],
    path: Path,
    command: str,
    model: str,
    seconds: float,
    plans: PlanTable | None = None,
) -> None:
    """Write the Markdown report: one section per set, the calibrated plans, and any kept notes block."""
    import platform

    import torch

    from models.eval.calibration_report import plans_section

    device = (
        "CUDA " + torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    items = ", ".join(f"{s.name}: {s.items}" for s in sets)
    body = "\n".join(_set_section(result, heading=len(sets) > 1) for result in sets)
    plan_part = plans_section(plans, path.parent) if plans else ""
    notes = _kept_notes(path)
    text = f"""# Retention study

Produced by `{command}`.

- Model: `{model}`.
- Items: {items}.
- Device: {device}.
- Wall time: {seconds / 60:.1f} min.

Retention = score / unpruned score. Budgets are average visual tokens per LLM layer, as a fraction of the
unpruned count. FLOPs: sum over LLM layers of 8SH^2 + 4S^2H + 4SHI. Prefill time: the measured LLM prefill only;
vision and pruning times are excluded. `nuwa` runs the model's calibrated plan for the item's task and budget
when `pruning_plans.json` has one (column `plan`), `nuwa_paper` always runs the paper's split.

{notes}{body}{plan_part}"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


__all__ = [
    "EvalSet",
    "TARGETS",
    "kind_table",
    "markdown_table",
    "plot",
    "targets_table",
    "verdict",
    "write_report",
]

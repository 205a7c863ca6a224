"""The retention study's report: the table, the per-kind table, the verdict, the plot and the Markdown file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from models.eval.scoring import Score


def _retention(value: float, reference: float) -> str:
    if reference != reference or value != value or reference == 0:
        return "n/a"
    return f"{100 * value / reference:.1f}%"


def markdown_table(scores: Sequence[Score]) -> str:
    reference = scores[0]
    lines = [
        "| method | budget | avg visual tokens | VQA EM | VQA retention | grounding Acc@0.5 | grounding retention "
        "| prefill GFLOPs | prefill ms/item |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for score in scores:
        budget = "100%" if score.budget is None else f"{100 * score.budget:g}%"
        lines.append(
            f"| {score.method} | {budget} | {score.mean_tokens:.1f} | {score.vqa:.3f} | "
            f"{_retention(score.vqa, reference.vqa)} | {score.grounding:.3f} | "
            f"{_retention(score.grounding, reference.grounding)} | {score.mean_flops / 1e9:.3f} | "
            f"{score.prefill_ms_per_item:.2f} |"
        )
    return "\n".join(lines)


def kind_table(scores: Sequence[Score]) -> str:
    """Accuracy per item kind: the unpruned model and every method at the smallest budget ("" without kinds)."""
    kinds = sorted(scores[0].by_kind)
    if not kinds:
        return ""
    budgets = [s.budget for s in scores if s.budget is not None]
    shown = [scores[0], *[s for s in scores if budgets and s.budget == min(budgets)]]
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
    baselines = [s for m, s in at_budget.items() if m in ("fastv", "visionzip", "pooling", "random")]
    best_baseline = max(baselines, key=lambda s: s.grounding, default=None)
    parts = [
        f"At {100 * budget:g}% average visual tokens, Nüwa keeps {_retention(nuwa.grounding, reference.grounding)} "
        f"of unpruned grounding and {_retention(nuwa.vqa, reference.vqa)} of VQA."
    ]
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
                axis.plot(xs, ys, marker="o", linewidth=2.5 if method == "nuwa" else 1.2, label=method)
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


def _kind_section(scores: Sequence[Score]) -> str:
    table = kind_table(scores)
    return f"\n## Per kind\n\n{table}\n" if table else ""


def write_report(
    scores: Sequence[Score], path: Path, plot_path: Path, command: str, model: str, seconds: float, items: int
) -> None:
    import platform

    import torch

    device = (
        "CUDA " + torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    text = f"""# Retention study

Produced by `{command}`.

- Model: `{model}`.
- Items: {items}.
- Device: {device}.
- Wall time: {seconds / 60:.1f} min.

Retention = score / unpruned score. Budgets are average visual tokens per LLM layer, as a fraction of the
unpruned count. FLOPs: sum over LLM layers of 8SH^2 + 4S^2H + 4SHI. Prefill time: the measured LLM prefill only;
vision and pruning times are excluded.

{markdown_table(scores)}

![retention]({plot_path.name})
{_kind_section(scores)}
## Verdict

{verdict(scores)}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


__all__ = ["kind_table", "markdown_table", "plot", "verdict", "write_report"]

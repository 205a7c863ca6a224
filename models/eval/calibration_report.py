"""What the calibration found, for people: the plan table in Markdown, and the plot of the split search.

The retention report (`models/eval/report.py`) embeds `plans_section`; `python -m models.eval --calibrate
--trace FILE.json` writes the search trace and `plot_trace` draws it next to it (FILE.png): every split the
search scored, per task and budget, accuracy against the tokens fed to the LLM (K1), coloured by drop layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from models.plans import CalibratedPlan, PlanTable, budget_key, default_plan_fields

CALIBRATION_PLOT = "calibration_trace.png"
"""The trace plot's file name the retention report looks for next to itself."""


def split_text(per_layer: Sequence[int]) -> str:
    """`63 -> 9 at layer 4` for a drop, `36 on every layer` without one."""
    first = per_layer[0]
    for layer, count in enumerate(per_layer):
        if count != first:
            return f"{first} -> {count} at layer {layer}"
    return f"{first} on every layer"


def drop_layer(per_layer: Sequence[int]) -> int | None:
    """The first layer that sees fewer tokens than layer 0 (None: no drop)."""
    for layer, count in enumerate(per_layer):
        if count != per_layer[0]:
            return layer
    return None


def options_text(options: Mapping[str, Any]) -> str:
    """The stage-1 / stage-2 options of a plan that differ from the released code's defaults, in words."""
    defaults = default_plan_fields()
    words = [f"region {options['region_size']}x{options['region_size']}"]
    words.append("top-n derived" if options["top_n"] is None else f"top-n {options['top_n']}")
    if not options["aggregation"]:
        words.append("no aggregation")
    else:
        for name in ("pillar_quantile", "pillar_by_key_norm", "convex_rows", "proximity_fraction"):
            if options[name] != defaults[name]:
                words.append(f"{name}={options[name]:g}" if isinstance(options[name], float) else name)
    source = {"attention": "", "distinct": "distinctness", "attention_distinct": "attention x distinctness"}[
        options.get("salience_source", "attention")
    ]
    if source:
        words.append(f"salience: {source}" + (" x key norm" if options["salience_key_norm"] else ""))
    elif options["salience_key_norm"]:
        words.append("salience x key norm")
    if options["stage2_layer"] is not None and options["stage2_scoring"] != defaults["stage2_scoring"]:
        words.append(f"stage 2 by {options['stage2_scoring']}")
    return ", ".join(words)


def _score_cell(plan: CalibratedPlan) -> str:
    scores = plan.scores
    if "calibrated" not in scores:
        return "n/a"
    return (
        f"{scores['calibrated']:.3f} / {scores.get('paper', float('nan')):.3f} / "
        f"{scores.get('unpruned', float('nan')):.3f} ({scores.get('items', '?')} items)"
    )


def plans_table(table: PlanTable) -> str:
    lines = [
        "| plan | split (visual tokens per layer) | paper's split | options | calibration: calibrated / paper / "
        "unpruned | plans scored | search s | stopped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for plan in table.plans:
        paper = plan.scores.get("paper_per_layer")
        lines.append(
            f"| `{plan.label}` | {split_text(plan.per_layer)} | {split_text(paper) if paper else 'n/a'} | "
            f"{options_text(plan.options)} | {_score_cell(plan)} | {plan.scores.get('candidates', 'n/a')} | "
            f"{plan.scores.get('seconds', 'n/a')} | {plan.scores.get('stopped', 'n/a')} |"
        )
    return "\n".join(lines)


def plans_section(table: PlanTable, report_dir: Path) -> str:
    """The report's `## Calibrated plans` section (with the trace plot when it lies next to the report)."""
    meta = table.meta
    facts = []
    if meta.get("data"):
        facts.append(f"- Calibration data: {meta['data']}.")
    if meta.get("items"):
        facts.append("- Items per task: " + ", ".join(f"{k} {v}" for k, v in meta["items"].items()) + ".")
    if meta.get("seconds") is not None:
        facts.append(
            f"- Search time: {meta['seconds'] / 60:.1f} min (bound {meta.get('time_limit_s', 0) / 60:g} min)."
        )
    if meta.get("command"):
        facts.append(f"- Produced by `{meta['command']}`.")
    if table.shape is not None:
        shape = table.shape
        facts.append(
            f"- Calibration shape: {shape.num_tokens} visual tokens ({shape.grid[0]}x{shape.grid[1]}), "
            f"{shape.num_layers} LLM layers, family {shape.family}."
        )
    plot = (
        f"\n![calibration search]({CALIBRATION_PLOT})\n" if (report_dir / CALIBRATION_PLOT).is_file() else ""
    )
    return f"""
## Calibrated plans

`pruning_plans.json` next to the model: the plan `nuwa` runs per (task, budget). Scores are accuracies on the
calibration split (grounding Acc@0.5 for `ground`, VQA exact match for `answer`), never on the sets above.

{chr(10).join(facts)}

{plans_table(table)}
{plot}"""


def plot_trace(trace: Sequence[Mapping[str, Any]], table: PlanTable, path: Path) -> None:
    """Every split scored, per (task, budget): accuracy vs K1, colour = drop layer, star = chosen plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(search["task"] for search in trace))
    budgets = list(dict.fromkeys(budget_key(search["budget"]) for search in trace))
    if not tasks or not budgets:
        return
    figure, axes = plt.subplots(
        len(tasks), len(budgets), figsize=(4.2 * len(budgets), 3.4 * len(tasks)), squeeze=False
    )
    layers = table.shape.num_layers if table.shape is not None else 8
    colours = plt.get_cmap("viridis")
    for search in trace:
        axis = axes[tasks.index(search["task"])][budgets.index(budget_key(search["budget"]))]
        for candidate in search["candidates"]:
            if candidate["group"] not in ("split", "start") and not (candidate["best"] or candidate["paper"]):
                continue
            per_layer = candidate["per_layer"]
            layer = drop_layer(per_layer)
            colour = "grey" if layer is None else colours(layer / max(1, layers - 1))
            accuracy = candidate["correct"] / candidate["items"]
            size = 12 + 60 * candidate["items"] / max(c["items"] for c in search["candidates"])
            marker = "o" if candidate["pass"] == 0 else "^"
            axis.scatter(per_layer[0], accuracy, s=size, color=colour, marker=marker, alpha=0.75)
            if candidate["paper"]:
                axis.scatter(
                    per_layer[0], accuracy, s=140, facecolors="none", edgecolors="red", linewidths=1.5
                )
            if candidate["best"]:
                axis.scatter(per_layer[0], accuracy, s=220, marker="*", color="black")
        axis.set_title(f"{search['task']} @ {budget_key(search['budget'])}", fontsize=10)
        axis.set_xlabel("K1: visual tokens into the LLM")
        axis.grid(alpha=0.3)
    for row, task in enumerate(tasks):
        axes[row][0].set_ylabel("grounding Acc@0.5" if task == "ground" else "VQA exact match")
    handles = [
        plt.Line2D(
            [], [], marker="o", linestyle="", color=colours(k / max(1, layers - 1)), label=f"drop at {k}"
        )
        for k in range(1, layers)
    ]
    handles += [
        plt.Line2D([], [], marker="o", linestyle="", color="grey", label="no drop"),
        plt.Line2D(
            [], [], marker="o", linestyle="", markerfacecolor="none", color="red", label="paper's split"
        ),
        plt.Line2D([], [], marker="*", linestyle="", color="black", label="chosen plan"),
    ]
    figure.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    figure.suptitle(
        "Calibration search: every split scored (o first pass, ^ refinement; size = items)", fontsize=10
    )
    figure.tight_layout(rect=(0, 0.08, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


__all__ = [
    "CALIBRATION_PLOT",
    "drop_layer",
    "options_text",
    "plans_section",
    "plans_table",
    "plot_trace",
    "split_text",
]

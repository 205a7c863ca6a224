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

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from models import scenes
from models.budget import METHODS, PruningConfig
from models.runner import ModelRunner
from models.tasks import TaskRequest

logger = logging.getLogger(__name__)

DEFAULT_BUDGETS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class EvalItem:
    """One scored item: a grounding phrase with its box, or a question with its answer."""

    kind: str  # "ground" | "vqa"
    image: Image.Image
    text: str
    box: tuple[float, float, float, float] | None = None
    answer: str | None = None
    subkind: str | None = None  # e.g. "ground/extremal", "vqa/count": scored apart in the per-kind table


@dataclass
class Score:
    """Accumulated results of one configuration."""

    label: str
    method: str
    budget: float | None
    grounding_correct: int = 0
    grounding_total: int = 0
    vqa_correct: int = 0
    vqa_total: int = 0
    visual_tokens: list[float] = field(default_factory=list)
    original_tokens: list[int] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    flops_unpruned: list[float] = field(default_factory=list)
    prefill_s: float = 0.0
    items: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # subkind -> [correct, total]

    def add(self, item: EvalItem, correct: bool) -> None:
        """Count one scored item, overall and under its subkind."""
        if item.kind == "ground":
            self.grounding_total += 1
            self.grounding_correct += int(correct)
        else:
            self.vqa_total += 1
            self.vqa_correct += int(correct)
        if item.subkind is not None:
            tally = self.by_kind.setdefault(item.subkind, [0, 0])
            tally[0] += int(correct)
            tally[1] += 1

    @property
    def grounding(self) -> float:
        return self.grounding_correct / self.grounding_total if self.grounding_total else float("nan")

    @property
    def vqa(self) -> float:
        return self.vqa_correct / self.vqa_total if self.vqa_total else float("nan")

    @property
    def mean_tokens(self) -> float:
        return sum(self.visual_tokens) / max(1, len(self.visual_tokens))

    @property
    def mean_flops(self) -> float:
        return sum(self.flops) / max(1, len(self.flops))

    @property
    def prefill_ms_per_item(self) -> float:
        return 1000 * self.prefill_s / max(1, self.items)


def scene_items(limit: int | None = None) -> list[EvalItem]:
    """The committed evaluation set (regenerated from its seed), grounding items first."""
    count = limit if limit is not None else 1000
    grounding, vqa = scenes.evaluation_set(num_grounding=count, num_vqa=count)
    items = [
        EvalItem(
            "ground",
            scenes.render(item.scene),
            item.phrase,
            box=tuple(map(float, item.box)),
            subkind=f"ground/{item.kind}",
        )
        for item in grounding
    ]
    items += [
        EvalItem(
            "vqa", scenes.render(item.scene), item.question, answer=item.answer, subkind=f"vqa/{item.kind}"
        )
        for item in vqa
    ]
    return items


def stage_items(stage: str, limit: int | None = None) -> list[EvalItem]:
    """Held-out items of one training-curriculum stage (`models.builtin.data.STAGES`), grounding items first.

    ``single`` (one object per scene) measures pruning where a partly trained built-in model already grounds:
    on the evaluation set's 1-5 objects a model that cannot yet tell objects apart scores near zero unpruned,
    and retention is then noise.
    """
    from models.builtin.data import stage_eval_examples

    count = limit if limit is not None else 1000
    items = []
    for example in stage_eval_examples(stage, 2 * count):
        image = scenes.render(example.scene)
        if example.box is not None:
            box = tuple(map(float, example.box))
            items.append(EvalItem("ground", image, str(example.phrase), box=box, subkind=example.kind))
        else:
            items.append(EvalItem("vqa", image, example.prompt, answer=example.answer, subkind=example.kind))
    return items


def jsonl_items(path: Path, limit: int | None = None) -> list[EvalItem]:
    """User-supplied RefCOCO-style / VQA items (format in the module docstring)."""
    items: list[EvalItem] = []
    counts = {"ground": 0, "vqa": 0}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        kind = record.get("type")
        if kind not in counts:
            raise ValueError(f"{path}:{number}: type must be 'ground' or 'vqa', got {kind!r}")
        if limit is not None and counts[kind] >= limit:
            continue
        image = Image.open(path.parent / record["image"]).convert("RGB")
        subkind = None if record.get("kind") is None else str(record["kind"])
        if kind == "ground":
            box = tuple(map(float, record["box"]))
            items.append(EvalItem("ground", image, record["phrase"], box=box, subkind=subkind))
        else:
            items.append(
                EvalItem("vqa", image, record["question"], answer=str(record["answer"]), subkind=subkind)
            )
        counts[kind] += 1
    return items


def configurations(methods: Sequence[str], budgets: Sequence[float]) -> Iterator[tuple[str, PruningConfig]]:
    yield "none", PruningConfig(method="none")
    for method in methods:
        if method == "none":
            continue
        for budget in budgets:
            yield f"{method}@{budget:g}", PruningConfig(method=method, budget=budget)


def evaluate(
    runner: ModelRunner,
    items: Sequence[EvalItem],
    label: str,
    config: PruningConfig,
    batch_size: int = 16,
    progress: tqdm | None = None,
) -> Score:
    """Run one configuration over all items (batched) and score it."""
    score = Score(
        label=label, method=config.method, budget=config.budget if config.method != "none" else None
    )
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        tasks = [
            TaskRequest(
                image=item.image,
                kind="ground" if item.kind == "ground" else "answer",
                text=item.text,
                config=config,
                max_new_tokens=8 if item.kind == "ground" else 4,
            )
            for item in chunk
        ]
        results, timings = runner.run(tasks)
        score.prefill_s += timings.prefill
        score.items += len(chunk)
        for item, result in zip(chunk, results, strict=True):
            score.visual_tokens.append(result.report.average)
            score.original_tokens.append(result.report.original)
            score.flops.append(result.report.flops_prefill)
            score.flops_unpruned.append(result.report.flops_prefill_unpruned)
            if item.kind == "ground":
                predicted = result.boxes[0].xyxy if result.boxes else None
                score.add(item, scenes.grounding_correct(predicted, item.box))
            else:
                score.add(item, scenes.vqa_correct(result.text, item.answer or ""))
        if progress is not None:
            progress.update(len(chunk))
    return score


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
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budgets", nargs="+", type=float, default=list(DEFAULT_BUDGETS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("docs/RETENTION.md"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import sys

    import torch

    from models.loading import load_adapter

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runner = load_adapter(args.model, device=args.device)
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


if __name__ == "__main__":
    main()

"""Running one pruning configuration over the items and scoring it (Acc@0.5, VQA exact match, tokens, FLOPs)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from models.budget import PruningConfig
from models.builtin import scenes
from models.eval.items import EvalItem
from models.methods import get_method
from models.runner import ModelRunner
from models.tasks import BatchTimings, TaskRequest, TaskResult

DEFAULT_BUDGETS = (0.25, 0.5, 0.75)
"""Keep ratios the study runs every pruning method at."""


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
    plans: Counter[str] = field(default_factory=Counter)  # report.plan label -> items that ran it

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
    def plan_summary(self) -> str:
        """Which splits ran, e.g. `paper` or `calibrated:ground, calibrated:answer` (budgets dropped)."""
        names = dict.fromkeys(label.split("@")[0] for label, _ in self.plans.most_common())
        return ", ".join(names) or "paper"

    @property
    def mean_tokens(self) -> float:
        return sum(self.visual_tokens) / max(1, len(self.visual_tokens))

    @property
    def mean_flops(self) -> float:
        return sum(self.flops) / max(1, len(self.flops))

    @property
    def prefill_ms_per_item(self) -> float:
        return 1000 * self.prefill_s / max(1, self.items)


def configurations(methods: Sequence[str], budgets: Sequence[float]) -> Iterator[tuple[str, PruningConfig]]:
    """The unpruned reference first, then every pruning method at every budget (methods that keep all: once)."""
    yield "none", PruningConfig(method="none")
    for method in methods:
        if not get_method(method).prunes:
            continue
        for budget in budgets:
            yield f"{method}@{budget:g}", PruningConfig(method=method, budget=budget)


def run_chunk(
    runner: ModelRunner, chunk: Sequence[EvalItem], config: PruningConfig
) -> tuple[list[tuple[EvalItem, TaskResult, bool]], BatchTimings]:
    """One batched run of `config` over `chunk`: each item with its result and whether it was right."""
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
    scored = []
    for item, result in zip(chunk, results, strict=True):
        if item.kind == "ground":
            predicted = result.boxes[0].xyxy if result.boxes else None
            correct = scenes.grounding_correct(predicted, item.box)
        else:
            correct = scenes.vqa_correct(result.text, item.answer or "")
        scored.append((item, result, correct))
    return scored, timings


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
        label=label, method=config.method, budget=config.budget if get_method(config.method).prunes else None
    )
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        scored, timings = run_chunk(runner, chunk, config)
        score.prefill_s += timings.prefill
        score.items += len(chunk)
        for item, result, correct in scored:
            score.visual_tokens.append(result.report.average)
            score.original_tokens.append(result.report.original)
            score.flops.append(result.report.flops_prefill)
            score.flops_unpruned.append(result.report.flops_prefill_unpruned)
            score.plans[result.report.plan] += 1
            score.add(item, correct)
        if progress is not None:
            progress.update(len(chunk))
    return score


__all__ = ["Score", "configurations", "evaluate", "run_chunk"]

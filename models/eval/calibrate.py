"""`python -m models.eval --calibrate`: search Nüwa's plan per task and budget on a calibration split.

Why: the paper splits every budget the same way (K1 tokens into the LLM, K2 = K1 / 7 after the drop at the middle
layer), for every task. The same average can be split in many ways, and grounding and VQA need different things.
This search finds, for each (task, budget), the best plan of the method's own options on items that the
evaluation never sees, and writes it into the model directory's `pruning_plans.json` (`models/plans.py`), where
the runner picks it up for `method=nuwa`.

The plan space (all existing `PruningConfig` fields, `models.plans.PLAN_FIELDS`):
- the split: the drop layer K (1..L-1) and K1, with K2 = floor((T - K * K1) / (L - K)) so the average never
  exceeds the budget A (T = A * L, or the paper's total when its rounding kept fewer), or no drop at all
  (T // L on every layer);
- stage-1 selection: region size and top-n per region; the salience (attention, feature distinctness, or their
  product), each with or without the key norm;
- aggregation off, or on with each pillar rule (quantile, key norm), convex rows or another proximity radius;
- the stage-2 scoring.

The bar every candidate must pass before it is scored: at the calibration shape its average is <= A and its
prefill FLOPs are <= the paper split's for ANY text length (sum of per-layer counts and sum of their squares
both <= the paper's: the FLOPs difference is linear in the text length with those two sums as coefficients).

How the search stays cheap (a few hundred items, minutes per plan on one CPU thread): coordinate descent from
the paper's split, one option group at a time (salience, split, selection, aggregation, scoring), each group
screened by successive halving (every value on the first eighth of the items, the best third on three eighths,
the best few on all of them); a second pass refines K1 around the winner. Results are memoised per candidate and
item, and a candidate is only ever extended to more items, never rerun. A group's winner replaces the incumbent
only if it answers more calibration items right (or as many at lower FLOPs). The search of a (task, budget)
stops when a pass changes nothing ("converged"), after `max_passes` passes ("max passes"), when the incumbent
matches the unpruned model ("matches unpruned"), or at its share of `--time-limit` ("time limit"; pairs run from
the smallest budget up, and a pair's share of the time left is weighted by 1 - its keep ratio).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from tqdm import tqdm

from models.budget import Family, PruningConfig, TokenPlan, plan_tokens, target_tokens
from models.eval.items import EvalItem
from models.eval.scoring import run_chunk
from models.plans import (
    CALIBRATED_METHOD,
    PLAN_FIELDS,
    CalibratedPlan,
    CalibrationShape,
    PlanTable,
    budget_key,
    default_plan_fields,
)
from models.runner import ModelRunner

logger = logging.getLogger(__name__)

Options = dict[str, Any]
"""A value for every name in `PLAN_FIELDS`."""

ITEM_TASK = {"ground": "ground", "vqa": "answer"}
"""`EvalItem.kind` -> the runner's task kind a plan is calibrated for."""

METRIC = {"ground": "grounding Acc@0.5", "answer": "VQA exact match"}

SELECTION_VALUES: tuple[tuple[int, int | None], ...] = (
    (2, None),
    (2, 1),
    (2, 2),
    (2, 3),
    (2, 4),
    (3, None),
    (3, 2),
    (3, 3),
    (3, 4),
    (3, 6),
    (4, None),
    (4, 4),
    (4, 8),
    (6, None),
)
"""(region_size, top_n) pairs of the selection group; top_n None derives it from K1 (`derive_top_n`)."""

AGGREGATION_VALUES: tuple[dict[str, Any], ...] = (
    {"aggregation": False},
    {"aggregation": True},
    {"aggregation": True, "pillar_quantile": 0.0},
    {"aggregation": True, "pillar_quantile": 0.3},
    {"aggregation": True, "pillar_quantile": 0.8},
    {"aggregation": True, "pillar_by_key_norm": True},
    {"aggregation": True, "convex_rows": True},
    {"aggregation": True, "proximity_fraction": 0.1},
    {"aggregation": True, "proximity_fraction": 0.5},
)
"""The aggregation group: off, or on with the default pillars and each alternative rule (others at default)."""

AGGREGATION_FIELDS = ("pillar_quantile", "pillar_by_key_norm", "convex_rows", "proximity_fraction")
SCORING_VALUES = ("last_token_mean", "last3_max", "text_cosine")
SALIENCE_SOURCES = ("attention", "distinct", "attention_distinct")
"""`PruningConfig.salience_source` values of the salience group, each with and without the key norm."""


class OutOfTime(Exception):
    """The search of one (task, budget) reached its time bound; the incumbent stands."""


@dataclass(frozen=True)
class SearchSettings:
    """How hard to search.

    Attributes:
        rungs: item counts of successive halving, the last = every calibration item of the task.
        keep_fraction: share of a rung's candidates promoted to the next rung (at least `min_keep`).
        min_keep: fewest candidates promoted.
        max_passes: passes over the option groups (the later ones refine the split around the winner).
        splits_per_layer: K1 values per drop layer in the first pass.
        batch_size: items per batched run.
    """

    rungs: tuple[int, ...]
    keep_fraction: float = 1 / 3
    min_keep: int = 2
    max_passes: int = 2
    splits_per_layer: int = 4
    batch_size: int = 32

    @classmethod
    def for_items(cls, count: int, **overrides: Any) -> SearchSettings:
        """Rungs of an eighth, three eighths and all of `count` items (fewer rungs for tiny sets)."""
        rungs = sorted({max(1, count // 8), max(1, 3 * count // 8), count})
        return cls(rungs=tuple(rungs), **overrides)


@dataclass(frozen=True)
class Bar:
    """What every candidate must meet: average <= `target`, and FLOPs <= the paper's for any text length."""

    target: int
    paper_sum: int
    paper_squares: int

    @classmethod
    def of_paper(cls, target: int, paper_per_layer: Sequence[int]) -> Bar:
        return cls(target, sum(paper_per_layer), sum(c * c for c in paper_per_layer))

    def total(self, num_layers: int) -> int:
        """Most visual tokens summed over layers: the budget's, or the paper's when its rounding kept fewer."""
        return min(self.target * num_layers, self.paper_sum)

    def admits(self, per_layer: Sequence[int]) -> bool:
        total = sum(per_layer)
        return (
            total <= self.target * len(per_layer)
            and total <= self.paper_sum
            and sum(c * c for c in per_layer) <= self.paper_squares
        )


def options_key(options: Options) -> tuple[tuple[str, Any], ...]:
    return tuple((name, options[name]) for name in PLAN_FIELDS)


def canonical(options: Options) -> Options:
    """`options` with the fields that cannot matter reset to defaults, so equal plans share one memo entry."""
    defaults = default_plan_fields()
    out = dict(options)
    if not out["aggregation"]:
        for name in AGGREGATION_FIELDS:
            out[name] = defaults[name]
    if out["stage2_ratio"] is not None and out["stage2_ratio"] >= 1.0:  # no drop: layer and scoring unused
        out["stage2_layer"] = None
        out["stage2_scoring"] = defaults["stage2_scoring"]
    return out


def describe(options: Options) -> dict[str, Any]:
    """The fields of `options` that differ from the code defaults (the split fields always shown)."""
    defaults = default_plan_fields()
    split = ("stage1_fraction", "stage2_ratio", "stage2_layer")
    return {k: v for k, v in options.items() if k in split or v != defaults[k]}


class Planner:
    """Turns options into configs and per-layer counts at the calibration shape."""

    def __init__(self, shape: CalibrationShape, budget: int | float) -> None:
        self.shape = shape
        self.budget = budget
        probe = PruningConfig(method=CALIBRATED_METHOD, budget=budget)
        target = target_tokens(probe, shape.num_tokens)
        if target is None or target >= shape.num_tokens:
            raise ValueError(f"budget {budget!r} keeps every token of a {shape.num_tokens}-token image")
        self.target = target

    def config(self, options: Options) -> PruningConfig:
        return PruningConfig(method=CALIBRATED_METHOD, budget=self.budget, **options)

    def plan(self, config: PruningConfig) -> TokenPlan:
        """What the engine will plan for `config` on an image of the calibration shape."""
        shape = self.shape
        family = cast(Family, shape.family)
        return plan_tokens(config, shape.num_tokens, shape.num_layers, shape.grid, family)

    def canonical(self, options: Options) -> Options:
        """`canonical(options)` with a derived top-n written out, so "derived" and its value are one plan."""
        out = canonical(options)
        if out["top_n"] is None:
            out["top_n"] = self.plan(self.config(out)).top_n
        return out

    def per_layer(self, options: Options) -> tuple[int, ...]:
        return self.plan(self.config(options)).per_layer

    def paper_options(self) -> Options:
        """The paper's split written as explicit plan fields (the search's starting point)."""
        paper = self.plan(PruningConfig(method=CALIBRATED_METHOD, budget=self.budget))
        options = default_plan_fields()
        options.update(
            stage1_fraction=paper.stage1_tokens / self.shape.num_tokens,
            stage2_ratio=paper.stage2_tokens / paper.stage1_tokens,
            stage2_layer=paper.stage2_layer,
            top_n=paper.top_n,
        )
        return canonical(options)

    def split(self, stage1: int, stage2: int, layer: int | None) -> dict[str, Any]:
        """The split fields for K1 = `stage1`, K2 = `stage2` at drop layer `layer` (None: no drop)."""
        if layer is None or stage2 >= stage1:
            return {
                "stage1_fraction": stage1 / self.shape.num_tokens,
                "stage2_ratio": 1.0,
                "stage2_layer": None,
            }
        return {
            "stage1_fraction": stage1 / self.shape.num_tokens,
            "stage2_ratio": stage2 / stage1,
            "stage2_layer": layer,
        }

    def feasible_stage1(self, layer: int, bar: Bar) -> list[tuple[int, int]]:
        """Every (K1, K2) with a drop at `layer` that the bar admits, K1 ascending."""
        num_tokens, num_layers = self.shape.num_tokens, self.shape.num_layers
        total = bar.total(num_layers)
        pairs = []
        for stage1 in range(total // num_layers + 1, num_tokens + 1):
            stage2 = (total - layer * stage1) // (num_layers - layer)
            if not 1 <= stage2 < stage1:
                continue
            per_layer = (stage1,) * layer + (stage2,) * (num_layers - layer)
            if bar.admits(per_layer):
                pairs.append((stage1, stage2))
        return pairs

    def split_values(
        self, bar: Bar, per_layer: int, around: tuple[int | None, int] | None = None
    ) -> list[dict[str, Any]]:
        """Split candidates: no drop, plus `per_layer` K1 values per drop layer spread over the feasible
        range; with `around` = (layer, K1) of the incumbent, the neighbouring layers and the K1 values next to it.
        """
        flat = bar.total(self.shape.num_layers) // self.shape.num_layers
        values = [self.split(flat, flat, None)] if bar.admits((flat,) * self.shape.num_layers) else []
        layers = range(1, self.shape.num_layers)
        if around is not None and around[0] is not None:
            layers = range(max(1, around[0] - 1), min(self.shape.num_layers - 1, around[0] + 1) + 1)
        for layer in layers:
            pairs = self.feasible_stage1(layer, bar)
            if not pairs:
                continue
            if around is None or around[0] is None:
                picks = _spread(len(pairs), per_layer)
            else:
                nearest = min(range(len(pairs)), key=lambda i: abs(pairs[i][0] - around[1]))
                step = max(1, len(pairs) // (4 * per_layer))
                picks = sorted({min(len(pairs) - 1, max(0, nearest + d * step)) for d in (-2, -1, 0, 1, 2)})
            values += [self.split(*pairs[i], layer) for i in picks]
        return values


def _spread(count: int, picks: int) -> list[int]:
    """`picks` indices spread evenly over 0..count-1, the last one always included."""
    if count <= picks:
        return list(range(count))
    return sorted({round((count - 1) * (i + 1) / picks) for i in range(picks)})


class CandidateScorer:
    """Scores candidates on prefixes of one task's calibration items; each (candidate, item) runs once."""

    def __init__(
        self,
        runner: ModelRunner,
        items: Sequence[EvalItem],
        planner: Planner,
        batch_size: int,
        progress: tqdm | None,
        deadline: float,
    ) -> None:
        self.runner = runner
        self.items = list(items)
        self.planner = planner
        self.batch_size = batch_size
        self.progress = progress
        self.deadline = deadline
        self.results: dict[tuple, list[bool]] = {}
        self.origin: dict[tuple, tuple[int, str]] = {}  # first (pass, group) that proposed the candidate
        self.evaluations = 0

    def correct(self, options: Options, count: int) -> int:
        """Right answers of `options` on the first `count` items (runs only the items not yet scored)."""
        key = options_key(options)
        done = self.results.setdefault(key, [])
        if len(done) < count and time.monotonic() > self.deadline:
            raise OutOfTime
        config = self.planner.config(options)
        while len(done) < count:
            chunk = self.items[len(done) : min(count, len(done) + self.batch_size)]
            scored, _ = run_chunk(self.runner, chunk, config)
            done.extend(correct for _, _, correct in scored)
            self.evaluations += len(chunk)
            if self.progress is not None:
                self.progress.update(len(chunk))
        return sum(done[:count])


@dataclass
class PlanSearch:
    """The search of one (task, budget) (see the module docstring)."""

    task: str
    planner: Planner
    scorer: CandidateScorer
    settings: SearchSettings
    unpruned: int
    bar: Bar = field(init=False)
    stopped: str = "converged"

    def __post_init__(self) -> None:
        paper = self.planner.paper_options()
        self.paper = paper
        self.bar = Bar.of_paper(self.planner.target, self.planner.per_layer(paper))

    def cost(self, options: Options) -> int:
        return sum(c * c for c in self.planner.per_layer(options))

    def run(self) -> Options:
        incumbent = self.paper if self.bar.admits(self.planner.per_layer(self.paper)) else self._flat()
        full = self.settings.rungs[-1]
        try:
            self.scorer.correct(incumbent, full)
            for number in range(self.settings.max_passes):
                changed = False
                for group, values in self._groups(number):
                    if self.scorer.correct(incumbent, full) >= self.unpruned:
                        self.stopped = "matches unpruned"
                        return incumbent
                    winner = self._sweep(values, incumbent, number, group)
                    if winner is not incumbent:
                        incumbent, changed = winner, True
                if not changed:
                    break
            else:
                self.stopped = "max passes"  # the last pass still changed the plan
        except OutOfTime:
            self.stopped = "time limit"
        return incumbent

    def _flat(self) -> Options:
        flat = self.bar.total(self.planner.shape.num_layers) // self.planner.shape.num_layers
        return self.planner.canonical({**self.paper, **self.planner.split(flat, flat, None)})

    def _groups(self, number: int) -> list[tuple[str, Callable[[Options], list[Options]]]]:
        """The option groups of pass `number`, each a function of the incumbent at the time it is swept."""

        def split_values(incumbent: Options) -> list[Options]:
            around = None
            if number > 0:
                stage1 = round(incumbent["stage1_fraction"] * self.planner.shape.num_tokens)
                around = (incumbent["stage2_layer"], stage1)
            values = self.planner.split_values(self.bar, self.settings.splits_per_layer, around)
            return [{**incumbent, **value} for value in values]

        def selection_values(incumbent: Options) -> list[Options]:
            return [{**incumbent, "region_size": r, "top_n": n} for r, n in SELECTION_VALUES]

        def aggregation_values(incumbent: Options) -> list[Options]:
            defaults = default_plan_fields()
            reset = {name: defaults[name] for name in ("aggregation", *AGGREGATION_FIELDS)}
            return [{**incumbent, **reset, **value} for value in AGGREGATION_VALUES]

        def salience_values(incumbent: Options) -> list[Options]:
            return [
                {**incumbent, "salience_source": source, "salience_key_norm": key_norm}
                for source in SALIENCE_SOURCES
                for key_norm in (False, True)
            ]

        def scoring_values(incumbent: Options) -> list[Options]:
            return [{**incumbent, "stage2_scoring": value} for value in SCORING_VALUES]

        return [  # salience first: which tokens count as salient changes which split wins (distinctness keeps
            # whole objects, so it wants a larger K2 than attention does)
            ("salience", salience_values),
            ("split", split_values),
            ("selection", selection_values),
            ("aggregation", aggregation_values),
            ("scoring", scoring_values),
        ]

    def _sweep(
        self, make_values: Callable[[Options], list[Options]], incumbent: Options, number: int, group: str
    ) -> Options:
        """Successive halving over one group's values; the incumbent unless a value beats it on all items."""
        pool: dict[tuple, Options] = {options_key(incumbent): incumbent}
        for value in make_values(incumbent):
            value = self.planner.canonical(value)
            if not self.bar.admits(self.planner.per_layer(value)):
                continue
            key = options_key(value)
            pool.setdefault(key, value)
            self.scorer.origin.setdefault(key, (number, group))
        if len(pool) == 1:
            return incumbent
        incumbent_key = options_key(incumbent)
        candidates = list(pool.values())
        ranked: list[tuple[int, Options]] = []
        for rung in self.settings.rungs:
            ranked = sorted(
                ((self.scorer.correct(c, rung), c) for c in candidates),
                key=lambda pair: (pair[0], -self.cost(pair[1]), options_key(pair[1]) == incumbent_key),
                reverse=True,
            )
            keep = max(self.settings.min_keep, math.ceil(len(ranked) * self.settings.keep_fraction))
            candidates = [c for _, c in ranked[:keep]]
            if incumbent_key not in {options_key(c) for c in candidates}:
                candidates.append(incumbent)
        best_correct, best = ranked[0]
        held = self.scorer.correct(incumbent, self.settings.rungs[-1])
        if best_correct > held or (best_correct == held and self.cost(best) < self.cost(incumbent)):
            logger.info(
                "%s@%s %s: %d -> %d of %d right with %s",
                self.task,
                budget_key(self.planner.budget),
                group,
                held,
                best_correct,
                self.settings.rungs[-1],
                describe(best),
            )
            return best
        return incumbent


@dataclass
class CalibrationResult:
    """The table to write, plus the trace of every candidate scored (for the report's plot)."""

    table: PlanTable
    trace: list[dict[str, Any]]


def score_unpruned(
    runner: ModelRunner,
    items: Sequence[EvalItem],
    batch_size: int,
    shapes: Counter,
    progress: tqdm | None = None,
) -> int:
    """Right answers of the unpruned model on `items`; counts each image's (tokens, grid) into `shapes`."""
    correct = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        scored, _ = run_chunk(runner, chunk, PruningConfig(method="none"))
        for _, result, flag in scored:
            correct += flag
            shapes[(result.report.original, result.report.grid)] += 1
        if progress is not None:
            progress.update(len(chunk))
    return correct


def calibrate(
    runner: ModelRunner,
    items: Sequence[EvalItem],
    budgets: Sequence[int | float],
    tasks: Sequence[str] = ("ground", "answer"),
    time_limit_s: float = 7200.0,
    settings: SearchSettings | None = None,
    meta: dict[str, Any] | None = None,
    checkpoint: Callable[[CalibrationResult], None] | None = None,
) -> CalibrationResult:
    """Search a plan per (task, budget) on `items` (see the module docstring); the runner's plans are ignored.

    Args:
        runner: The model. Its own plan table is set aside while the search runs and restored after.
        items: Calibration items (disjoint from whatever they will be evaluated on).
        budgets: Budgets as requests state them (keep ratios or token counts); keep-all budgets are skipped.
        tasks: `ground` and/or `answer`.
        time_limit_s: Wall-clock bound of the whole search. Pairs run from the smallest budget up; each gets
            a share of the time left weighted by 1 - its keep ratio (small budgets have the most to gain).
        settings: Search effort (default: rungs from the item count).
        meta: Extra facts for the file's `calibration` record (data, command).
        checkpoint: Called with the plans so far after each (task, budget), so a long run can be saved as it goes.
    """
    started = time.monotonic()
    by_task = {task: [item for item in items if ITEM_TASK[item.kind] == task] for task in tasks}
    by_task = {task: task_items for task, task_items in by_task.items() if task_items}
    if not by_task:
        raise ValueError(f"no calibration items for tasks {list(tasks)}")
    normalised = [PruningConfig(budget=budget).budget for budget in budgets]
    estimate = sum(len(task_items) for task_items in by_task.values()) * (1 + 40 * len(normalised))
    progress = tqdm(total=estimate, unit="item", desc="calibration")
    saved_plans, runner.plans = runner.plans, PlanTable()
    try:
        return _calibrate(
            runner, by_task, normalised, time_limit_s, settings, meta or {}, progress, started, checkpoint
        )
    finally:
        runner.plans = saved_plans
        progress.close()


def _calibrate(
    runner: ModelRunner,
    by_task: dict[str, list[EvalItem]],
    budgets: Sequence[int | float | None],
    time_limit_s: float,
    settings: SearchSettings | None,
    meta: dict[str, Any],
    progress: tqdm,
    started: float,
    checkpoint: Callable[[CalibrationResult], None] | None,
) -> CalibrationResult:
    shapes: Counter[tuple[int, tuple[int, int]]] = Counter()
    unpruned = {}
    if settings is not None:  # explicit rungs: the last one is the task's whole calibration set
        by_task = {task: task_items[: settings.rungs[-1]] for task, task_items in by_task.items()}
    for task, task_items in by_task.items():
        progress.set_postfix_str(f"{task} unpruned")
        batch_size = (settings or SearchSettings.for_items(len(task_items))).batch_size
        unpruned[task] = score_unpruned(runner, task_items, batch_size, shapes, progress)
    (num_tokens, grid), _ = shapes.most_common(1)[0]
    shape = CalibrationShape(num_tokens, runner.adapter.num_llm_layers, grid, runner.adapter.family)
    pairs = []
    for budget in sorted((b for b in budgets if b is not None), key=lambda b: _keep_ratio(b, num_tokens)):
        for task in by_task:
            try:
                pairs.append((task, Planner(shape, budget)))
            except ValueError as exc:
                logger.warning("skipping budget %s: %s", budget, exc)
    # smaller budgets have the most to gain: each pair's share of the time left is weighted by 1 - keep ratio
    weights = [max(0.05, 1.0 - _keep_ratio(planner.budget, num_tokens)) for _, planner in pairs]
    plans: list[CalibratedPlan] = []
    trace: list[dict[str, Any]] = []
    stopped: dict[str, str] = {}
    for index, (task, planner) in enumerate(pairs):
        task_items = by_task[task]
        search_settings = settings or SearchSettings.for_items(len(task_items))
        remaining = time_limit_s - (time.monotonic() - started)
        deadline = time.monotonic() + max(0.0, remaining * weights[index] / sum(weights[index:]))
        scorer = CandidateScorer(runner, task_items, planner, search_settings.batch_size, progress, deadline)
        search = PlanSearch(task, planner, scorer, search_settings, unpruned[task])
        progress.set_postfix_str(f"{task}@{budget_key(planner.budget)}")
        pair_started = time.monotonic()
        best = search.run()
        full = search_settings.rungs[-1]
        scorer.deadline = float("inf")  # the reference scores below always complete
        if (
            len(shapes) == 1
        ):  # every image has the calibration shape: the paper's options ARE the paper's rule
            paper_correct = scorer.correct(search.paper, full)
        else:
            paper_config = PruningConfig(method=CALIBRATED_METHOD, budget=planner.budget)
            paper_correct = _score_config(runner, task_items[:full], paper_config, search_settings.batch_size)
        key = f"{task}@{budget_key(planner.budget)}"
        stopped[key] = search.stopped
        plans.append(
            CalibratedPlan(
                task=task,
                budget=planner.budget,
                options=best,
                per_layer=planner.per_layer(best),
                scores={
                    "metric": METRIC[task],
                    "items": full,
                    "calibrated": round(scorer.correct(best, full) / full, 4),
                    "paper": round(paper_correct / full, 4),
                    "unpruned": round(unpruned[task] / full, 4),
                    "paper_per_layer": list(planner.per_layer(search.paper)),
                    "candidates": len(scorer.results),
                    "item_runs": scorer.evaluations,
                    "seconds": round(time.monotonic() - pair_started, 1),
                    "stopped": search.stopped,
                },
            )
        )
        trace.append(_trace(task, planner, scorer, best, search.paper))
        logger.info(
            "%s: %s -> %s of %d right (paper %d, unpruned %d), %s",
            key,
            planner.per_layer(best),
            scorer.correct(best, full),
            full,
            paper_correct,
            unpruned[task],
            search.stopped,
        )
        if checkpoint is not None:
            checkpoint(_result(plans, trace, shape, by_task, pairs, meta, started, time_limit_s, stopped))
    return _result(plans, trace, shape, by_task, pairs, meta, started, time_limit_s, stopped)


def _keep_ratio(budget: int | float, num_tokens: int) -> float:
    return budget if isinstance(budget, float) else min(budget, num_tokens) / num_tokens


def _result(
    plans: list[CalibratedPlan],
    trace: list[dict[str, Any]],
    shape: CalibrationShape,
    by_task: dict[str, list[EvalItem]],
    pairs: list[tuple[str, Planner]],
    meta: dict[str, Any],
    started: float,
    time_limit_s: float,
    stopped: dict[str, str],
) -> CalibrationResult:
    record = {
        **meta,
        "items": {task: len(task_items) for task, task_items in by_task.items()},
        "budgets": sorted({budget_key(planner.budget) for _, planner in pairs}),
        "seconds": round(time.monotonic() - started, 1),
        "time_limit_s": time_limit_s,
        "stopped": dict(stopped),
    }
    return CalibrationResult(PlanTable(list(plans), shape, record), list(trace))


def _score_config(
    runner: ModelRunner, items: Sequence[EvalItem], config: PruningConfig, batch_size: int
) -> int:
    correct = 0
    for start in range(0, len(items), batch_size):
        scored, _ = run_chunk(runner, items[start : start + batch_size], config)
        correct += sum(flag for _, _, flag in scored)
    return correct


def _trace(
    task: str, planner: Planner, scorer: CandidateScorer, best: Options, paper: Options
) -> dict[str, Any]:
    """Every candidate the search scored for one (task, budget): its options, counts and score."""
    best_key, paper_key = options_key(best), options_key(paper)
    candidates = []
    for key, results in scorer.results.items():
        if not results:
            continue
        options = dict(key)
        number, group = scorer.origin.get(key, (0, "start"))
        candidates.append(
            {
                "options": describe(options),
                "per_layer": list(planner.per_layer(options)),
                "items": len(results),
                "correct": sum(results),
                "group": group,
                "pass": number,
                "best": key == best_key,
                "paper": key == paper_key,
            }
        )
    return {"task": task, "budget": planner.budget, "candidates": candidates}


def merge_tables(new: PlanTable, old: PlanTable) -> PlanTable:
    """`new`'s plans, plus `old`'s for (task, budget) pairs `new` did not calibrate, when both share a shape."""
    if old.shape != new.shape:
        return new
    covered = {(p.task, budget_key(p.budget)) for p in new.plans}
    kept = [p for p in old.plans if (p.task, budget_key(p.budget)) not in covered]
    return PlanTable([*kept, *new.plans], new.shape, new.meta)


__all__ = [
    "AGGREGATION_VALUES",
    "Bar",
    "CalibrationResult",
    "CandidateScorer",
    "OutOfTime",
    "PlanSearch",
    "Planner",
    "SELECTION_VALUES",
    "SearchSettings",
    "calibrate",
    "score_unpruned",
    "canonical",
    "describe",
    "merge_tables",
]

"""Calibrated pruning plans: Nüwa's split tuned per task and budget, stored next to the model.

Why this exists: the paper runs one split for every task (stage 1 keeps K1, the drop at the middle layer keeps
K2 = K1 / 7, the average over layers is the budget). The same average can be split in many ways, and what
grounding needs (every object still localisable) is not what VQA needs. `python -m models.eval --calibrate`
searches the split and the stage-1 options on a calibration split and writes the winner per (task, budget) into
`pruning_plans.json` in the model directory. `models/loading.py` loads that file, and the runner resolves each
request through `PlanTable.resolve`: a `method=nuwa` request whose task and budget have a calibrated plan runs
it, anything else runs the method's own rule (the paper's split for Nüwa).

A plan is a set of `PruningConfig` fields (`PLAN_FIELDS`): K1 as `stage1_fraction` of N, K2 as `stage2_ratio`
of K1 and the drop layer `stage2_layer`, so the plan scales with the image like the budget does (Qwen2.5-VL's N
varies per image); at the calibration shape (stored in the file) the per-layer counts are exactly the ones that
were scored. The request's own budget still sets the average; a plan only says how to split it.

Which plan ran is part of every report (`VisualTokenReport.plan`): `paper` (the method's published rule),
`custom` (the request set plan fields by hand) or `calibrated:<task>@<budget>`.

Pure Python (json, pydantic through `models.budget`): the API process can read plans without torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.budget import PruningConfig, target_tokens

PLAN_FILE_NAME = "pruning_plans.json"
"""The plan file's name inside a model directory."""

PLAN_FORMAT = "nuwa-pruning-plans/1"
"""The `format` tag of the file; a file with another tag is refused rather than misread."""

CALIBRATED_METHOD = "nuwa"
"""The only method a calibrated plan replaces; `nuwa_paper` and every baseline keep their own rule."""

PLAN_TASKS: tuple[str, ...] = ("ground", "answer")
"""Task kinds a plan can be calibrated for (`models.tasks.TaskKind`); `chat` always runs the paper's split."""

PLAN_FIELDS: tuple[str, ...] = (
    "stage1_fraction",
    "stage2_ratio",
    "stage2_layer",
    "region_size",
    "top_n",
    "aggregation",
    "pillar_quantile",
    "pillar_by_key_norm",
    "salience_key_norm",
    "salience_source",
    "convex_rows",
    "proximity_fraction",
    "stage2_scoring",
)
"""The `PruningConfig` fields a plan sets: the split (K1, K2, drop layer) and every stage-1 and stage-2 option."""

LATER_FIELD_DEFAULTS: dict[str, Any] = {"salience_source": "attention"}
"""Plan fields added after the first plan files were written, with the value those files meant (the salience
they were calibrated with), so an older `pruning_plans.json` still loads and runs exactly as before."""

PAPER_LABEL = "paper"
CUSTOM_LABEL = "custom"


def default_plan_fields() -> dict[str, Any]:
    """The `PLAN_FIELDS` values of a default `PruningConfig`: the paper's split, the released code's options."""
    defaults = PruningConfig()
    return {name: getattr(defaults, name) for name in PLAN_FIELDS}


def uses_default_plan(config: PruningConfig) -> bool:
    """True when `config` sets no plan field to anything but its default (so a calibrated plan may replace it).

    Compared by value, not by `model_fields_set`: the service rebuilds configs from `model_dump()` (load
    degradation), which marks every field as set.
    """
    return all(getattr(config, name) == value for name, value in default_plan_fields().items())


def rule_label(config: PruningConfig) -> str:
    """The report label of a config run without a calibrated plan: `paper`, or `custom` for hand-set fields."""
    return PAPER_LABEL if uses_default_plan(config) else CUSTOM_LABEL


def budget_key(budget: int | float) -> str:
    """How a budget reads in labels and the file: `0.25` for a keep ratio, `36` for a token count."""
    return f"{budget:g}" if isinstance(budget, float) else str(budget)


def calibrated_label(task: str, budget: int | float) -> str:
    """The report label of a calibrated plan, e.g. `calibrated:ground@0.25`."""
    return f"calibrated:{task}@{budget_key(budget)}"


@dataclass(frozen=True)
class CalibrationShape:
    """The image and model shape a plan was calibrated at (where its per-layer counts are exact)."""

    num_tokens: int
    num_layers: int
    grid: tuple[int, int]
    family: str

    def to_json(self) -> dict[str, Any]:
        return {
            "num_tokens": self.num_tokens,
            "num_layers": self.num_layers,
            "grid": list(self.grid),
            "family": self.family,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CalibrationShape:
        grid = tuple(int(v) for v in data["grid"])
        if len(grid) != 2:
            raise ValueError(f"plan shape grid must be [rows, cols], got {data['grid']!r}")
        return cls(int(data["num_tokens"]), int(data["num_layers"]), (grid[0], grid[1]), str(data["family"]))


@dataclass(frozen=True)
class CalibratedPlan:
    """The best plan found for one (task, budget), with the calibration scores that chose it.

    Attributes:
        task: `ground` or `answer`.
        budget: the budget it was calibrated for, as a request states it (keep ratio or token count).
        options: a value for every name in `PLAN_FIELDS`.
        per_layer: visual tokens each LLM layer sees at the calibration shape (what was scored).
        scores: calibration accuracies: `calibrated`, `paper`, `unpruned`, `items`, `candidates` (plans
            scored) and whatever else the search recorded.
    """

    task: str
    budget: int | float
    options: Mapping[str, Any]
    per_layer: tuple[int, ...]
    scores: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return calibrated_label(self.task, self.budget)

    def config(self, base: PruningConfig | None = None) -> PruningConfig:
        """`base` (default: `method=nuwa` at this plan's budget) with the plan's fields, validated."""
        base = base if base is not None else PruningConfig(method=CALIBRATED_METHOD, budget=self.budget)
        return PruningConfig(**{**base.model_dump(), **dict(self.options)})

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "budget": self.budget,
            "label": self.label,
            "options": {name: _json_value(self.options[name]) for name in PLAN_FIELDS},
            "per_layer": list(self.per_layer),
            "scores": dict(self.scores),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CalibratedPlan:
        task = str(data["task"])
        if task not in PLAN_TASKS:
            raise ValueError(f"plan task must be one of {PLAN_TASKS}, got {task!r}")
        options = {**LATER_FIELD_DEFAULTS, **dict(data["options"])}
        unknown = sorted(set(options) - set(PLAN_FIELDS))
        missing = sorted(set(PLAN_FIELDS) - set(options))
        if unknown or missing:
            raise ValueError(
                f"plan {task}@{data['budget']}: unknown fields {unknown}, missing fields {missing}"
            )
        if options.get("stage2_scoring") is not None:
            options["stage2_scoring"] = str(options["stage2_scoring"])
        budget = PruningConfig(budget=data["budget"]).budget
        if budget is None:
            raise ValueError(f"plan {task}: a calibrated plan needs a budget")
        plan = cls(
            task, budget, options, tuple(int(v) for v in data["per_layer"]), dict(data.get("scores", {}))
        )
        plan.config()  # every option must be a valid PruningConfig value
        return plan


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class PlanTable:
    """The calibrated plans of one model directory, and the rule that picks one per request.

    Attributes:
        plans: one plan per (task, budget), in file order.
        shape: where the plans were calibrated (None for an empty table).
        meta: what the file says about its calibration run (data, items, seconds, command, ...).
    """

    def __init__(
        self,
        plans: Iterable[CalibratedPlan] = (),
        shape: CalibrationShape | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.plans = list(plans)
        self.shape = shape
        self.meta = dict(meta or {})
        seen: set[tuple[str, str]] = set()
        for plan in self.plans:
            key = (plan.task, budget_key(plan.budget))
            if key in seen:
                raise ValueError(f"two plans for {plan.task}@{key[1]}")
            seen.add(key)

    def __len__(self) -> int:
        return len(self.plans)

    def __bool__(self) -> bool:
        return bool(self.plans)

    def find(self, task: str, budget: int | float | None, num_tokens: int) -> CalibratedPlan | None:
        """The plan for `task` whose budget asks for the same average tokens as `budget` on an N-token image.

        A float budget matches a float plan budget of the same value; otherwise the two match when they name the
        same target (`target_tokens`), e.g. the int 36 and the ratio 0.25 on a 144-token image.
        """
        if budget is None:
            return None
        request = PruningConfig(budget=budget)
        for plan in self.plans:
            if plan.task != task:
                continue
            if isinstance(budget, float) and isinstance(plan.budget, float):
                if math.isclose(budget, plan.budget, rel_tol=0.0, abs_tol=1e-9):
                    return plan
                continue
            if target_tokens(request, num_tokens) == target_tokens(
                PruningConfig(budget=plan.budget), num_tokens
            ):
                return plan
        return None

    def resolve(self, config: PruningConfig, task: str, num_tokens: int) -> tuple[PruningConfig, str | None]:
        """The config a request runs with, and the calibrated label when a plan replaced its split (else None).

        A plan applies only when every condition holds: the method is `nuwa`, the request sets no plan field by
        hand, its budget prunes (a keep-all request never changes) and a plan exists for its task and budget.
        """
        if config.method != CALIBRATED_METHOD or config.budget is None or not uses_default_plan(config):
            return config, None
        target = target_tokens(config, num_tokens)
        if target is None or target >= num_tokens:
            return config, None
        plan = self.find(task, config.budget, num_tokens)
        if plan is None:
            return config, None
        return plan.config(config), plan.label

    # ---- file ------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "shape": self.shape.to_json() if self.shape is not None else None,
            "calibration": self.meta,
            "plans": [plan.to_json() for plan in self.plans],
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the table as indented JSON (a model directory, or the file itself)."""
        target = plan_file(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_json(), indent=2)
        # one line per list of numbers (per-layer counts, grid): the file stays short enough to read
        text = re.sub(
            r"\[\s*([-0-9.,\s]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text
        )
        target.write_text(text + "\n")
        return target

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlanTable:
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a plan file: format is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
        shape = CalibrationShape.from_json(data["shape"]) if data.get("shape") else None
        plans = [CalibratedPlan.from_json(plan) for plan in data.get("plans", [])]
        return cls(plans, shape, data.get("calibration") or {})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PlanTable:
        """Read a plan file (a model directory or the file itself); ValueError names what is wrong."""
        target = plan_file(path)
        try:
            data = json.loads(target.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{target}: not valid JSON ({exc})") from None
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{target}: {exc}") from None

    @classmethod
    def for_model(cls, model_dir: str | os.PathLike[str]) -> PlanTable:
        """The table in `model_dir`, or an empty one when the directory has no plan file."""
        target = Path(model_dir) / PLAN_FILE_NAME
        return cls.load(target) if target.is_file() else cls()


def plan_file(path: str | os.PathLike[str]) -> Path:
    """`path` itself when it names a `.json` file, else `path / pruning_plans.json`."""
    path = Path(path)
    return path if path.suffix == ".json" else path / PLAN_FILE_NAME


__all__ = [
    "CALIBRATED_METHOD",
    "CUSTOM_LABEL",
    "PAPER_LABEL",
    "PLAN_FIELDS",
    "PLAN_FILE_NAME",
    "PLAN_FORMAT",
    "PLAN_TASKS",
    "CalibratedPlan",
    "CalibrationShape",
    "PlanTable",
    "budget_key",
    "calibrated_label",
    "default_plan_fields",
    "plan_file",
    "rule_label",
    "uses_default_plan",
]

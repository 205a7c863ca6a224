"""Calibrated plans: the file round-trips, the lookup rule, and every plan (committed or searchable) honours its
budget and the paper split's FLOPs."""

from __future__ import annotations

import json

import pytest

from models.budget import PruningConfig, plan_tokens, target_tokens
from models.builtin import BUILTIN_MODEL_DIR
from models.eval.calibrate import Bar, Planner, canonical
from models.plans import (
    PLAN_FIELDS,
    CalibratedPlan,
    CalibrationShape,
    PlanTable,
    default_plan_fields,
    rule_label,
    uses_default_plan,
)
from models.reports import prefill_flops

SHAPE = CalibrationShape(num_tokens=144, num_layers=8, grid=(12, 12), family="llava")


def _plan(task: str = "ground", budget: float | int = 0.25, **options) -> CalibratedPlan:
    fields = {
        **default_plan_fields(),
        "stage1_fraction": 50 / 144,
        "stage2_ratio": 26 / 50,
        "stage2_layer": 3,
    }
    fields.update(options)
    return CalibratedPlan(
        task, budget, fields, (50, 50, 50, 26, 26, 26, 26, 26), {"calibrated": 0.5, "items": 8}
    )


def test_the_plan_file_round_trips(tmp_path) -> None:
    table = PlanTable(
        [_plan(), _plan("answer", 0.5, region_size=3, top_n=4, aggregation=False), _plan("ground", 36)],
        SHAPE,
        {"data": "calibration split", "seconds": 12.5},
    )
    path = table.save(tmp_path)
    assert path == tmp_path / "pruning_plans.json"
    loaded = PlanTable.load(tmp_path)
    assert loaded.to_json() == table.to_json()
    assert loaded.shape == SHAPE and loaded.meta == {"data": "calibration split", "seconds": 12.5}
    assert [p.label for p in loaded.plans] == [
        "calibrated:ground@0.25",
        "calibrated:answer@0.5",
        "calibrated:ground@36",
    ]
    assert isinstance(loaded.plans[2].budget, int) and loaded.plans[1].options["aggregation"] is False
    text = path.read_text()
    assert '"per_layer": [50, 50, 50, 26, 26, 26, 26, 26]' in text  # number lists on one line
    assert json.loads(text)["format"] == "nuwa-pruning-plans/1"
    assert PlanTable.load(path).to_json() == table.to_json()  # the file itself works as well as its directory
    assert not PlanTable.for_model(tmp_path / "elsewhere")  # no file: an empty table


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(format="other/1"), "not a plan file"),
        (lambda d: d["plans"][0]["options"].update(colour="red"), "unknown fields"),
        (lambda d: d["plans"][0]["options"].pop("top_n"), "missing fields"),
        (lambda d: d["plans"][0].update(task="chat"), "plan task"),
        (lambda d: d["plans"][0]["options"].update(stage2_layer=0), "stage2_layer"),
        (lambda d: d["plans"].append(dict(d["plans"][0])), "two plans"),
    ],
)
def test_a_broken_plan_file_is_refused(tmp_path, edit, message) -> None:
    data = PlanTable([_plan()], SHAPE).to_json()
    edit(data)
    path = tmp_path / "pruning_plans.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        PlanTable.load(path)


def test_a_plan_replaces_only_a_default_nuwa_request_for_its_task_and_budget() -> None:
    table = PlanTable([_plan("ground", 0.25)], SHAPE)
    request = PruningConfig(method="nuwa", budget=0.25)
    config, label = table.resolve(request, "ground", 144)
    assert label == "calibrated:ground@0.25"
    assert config.stage2_layer == 3 and config.budget == 0.25 and config.method == "nuwa"
    assert table.resolve(PruningConfig(method="nuwa", budget=36), "ground", 144)[1] == label  # same target
    # everything else runs as sent
    unchanged = [
        (request, "answer"),  # no plan for this task
        (request, "chat"),
        (PruningConfig(method="nuwa", budget=0.5), "ground"),  # no plan for this budget
        (PruningConfig(method="nuwa_paper", budget=0.25), "ground"),  # the paper's split by name
        (PruningConfig(method="fastv", budget=0.25), "ground"),
        (PruningConfig(method="nuwa", budget=0.25, stage2_layer=2), "ground"),  # hand-set plan field
        (PruningConfig(method="nuwa"), "ground"),  # no budget: keep all
        (PruningConfig(method="nuwa", budget=1.0), "ground"),  # keep all
        (PruningConfig(method="nuwa", budget=144), "ground"),
    ]
    for config, task in unchanged:
        assert table.resolve(config, task, 144) == (config, None), (config, task)


def test_keep_all_is_never_replaced_even_by_a_keep_all_plan() -> None:
    table = PlanTable([_plan("ground", 1.0)], SHAPE)
    config = PruningConfig(method="nuwa", budget=1.0)
    assert table.resolve(config, "ground", 144) == (config, None)


def test_a_rebuilt_config_still_gets_its_plan() -> None:
    """The service's degradation rebuilds configs from model_dump(): every field is then 'set'."""
    rebuilt = PruningConfig(**PruningConfig(method="nuwa", budget=0.25).model_dump())
    assert uses_default_plan(rebuilt) and rule_label(rebuilt) == "paper"
    assert PlanTable([_plan()], SHAPE).resolve(rebuilt, "ground", 144)[1] == "calibrated:ground@0.25"
    assert rule_label(PruningConfig(method="nuwa", budget=0.25, aggregation=False)) == "custom"


@pytest.mark.parametrize(
    "shape",
    [
        SHAPE,
        CalibrationShape(576, 32, (24, 24), "llava"),
        CalibrationShape(1024, 28, (32, 32), "qwen2_5_vl"),
        CalibrationShape(64, 2, (8, 8), "generic"),
    ],
)
@pytest.mark.parametrize("budget", [0.25, 0.5, 0.75, 64])
def test_every_split_the_search_can_choose_honours_the_budget_and_the_flops_bar(shape, budget) -> None:
    """The engine's planner gives exactly the searched counts, the average never exceeds the budget, and the
    prefill FLOPs never exceed the paper's split at any text length."""
    if target_tokens(PruningConfig(budget=budget), shape.num_tokens) >= shape.num_tokens:
        with pytest.raises(ValueError, match="keeps every token"):
            Planner(shape, budget)  # nothing to calibrate
        return
    planner = Planner(shape, budget)
    paper = planner.per_layer(planner.paper_options())
    bar = Bar.of_paper(planner.target, paper)
    values = planner.split_values(bar, per_layer=6)
    values += planner.split_values(bar, per_layer=6, around=(shape.num_layers // 2, planner.target + 5))
    assert len(values) > 1
    for value in values:
        options = canonical({**planner.paper_options(), **value})
        per_layer = planner.per_layer(options)
        stage1 = round(value["stage1_fraction"] * shape.num_tokens)
        assert per_layer[0] == stage1
        if value["stage2_layer"] is not None:
            layer = value["stage2_layer"]
            assert (
                per_layer[:layer] == (stage1,) * layer and per_layer[layer] < stage1
            )  # the drop is where planned
        assert sum(per_layer) / len(per_layer) <= planner.target
        for text in (0, 40, 2000):
            flops = prefill_flops([text + c for c in per_layer], 4096, 11008)
            assert flops <= prefill_flops([text + c for c in paper], 4096, 11008)


def test_the_committed_plans_honour_their_budgets() -> None:
    """Every plan of the built-in model: planned exactly as stored, average <= budget, FLOPs <= the paper's."""
    table = PlanTable.for_model(BUILTIN_MODEL_DIR)
    assert table.shape == SHAPE
    assert {(p.task, p.budget) for p in table.plans} >= {
        (t, b) for t in ("ground", "answer") for b in (0.25, 0.5)
    }
    for plan in table.plans:
        config = plan.config()
        assert set(plan.options) == set(PLAN_FIELDS)
        planned = plan_tokens(config, 144, 8, (12, 12), "llava")
        assert planned.per_layer == plan.per_layer
        target = target_tokens(config, 144)
        assert planned.average <= target
        paper = plan_tokens(PruningConfig(method="nuwa", budget=plan.budget), 144, 8, (12, 12), "llava")
        assert list(paper.per_layer) == plan.scores["paper_per_layer"]
        assert sum(planned.per_layer) <= sum(paper.per_layer)
        assert sum(c * c for c in planned.per_layer) <= sum(c * c for c in paper.per_layer)
        assert plan.scores["calibrated"] >= plan.scores["paper"]  # the search starts from the paper's split


def test_a_plan_file_from_before_salience_source_loads_as_attention(tmp_path) -> None:
    data = PlanTable([_plan(salience_source="distinct")], SHAPE).to_json()
    del data["plans"][0]["options"]["salience_source"]  # what files written before the field hold
    path = tmp_path / "pruning_plans.json"
    path.write_text(json.dumps(data))
    plan = PlanTable.load(path).plans[0]
    assert plan.options["salience_source"] == "attention"
    assert plan.config().salience_source == "attention"


def test_the_salience_group_offers_every_source_with_and_without_the_key_norm() -> None:
    from models.eval.calibrate import SALIENCE_SOURCES

    assert SALIENCE_SOURCES == ("attention", "distinct", "attention_distinct")
    assert set(SALIENCE_SOURCES) == set(PruningConfig.model_fields["salience_source"].annotation.__args__)

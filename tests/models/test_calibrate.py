"""Calibrated plans end to end: the calibration split is disjoint from the evaluation set, the runner applies a
plan exactly (per-layer counts, drop layer), keep-all never changes, and `--calibrate` writes a plan file that
`load_runner` picks up (built-in model and a user's model + JSONL)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from models import eval as retention
from models.budget import PruningConfig, plan_tokens
from models.builtin import BUILTIN_MODEL_DIR, scenes
from models.eval.calibrate import SearchSettings, calibrate
from models.eval.items import CALIBRATION_SEED, calibration_items
from models.loading import load_runner
from models.plans import PLAN_FILE_NAME, CalibratedPlan, CalibrationShape, PlanTable, default_plan_fields
from models.tasks import TaskRequest
from tests.models.tiny import save_tiny_llava
from tests.support.eval_items import write_scene_jsonl

torch.set_num_threads(1)

# tiny LLaVA: 112 px, patch 14 -> 8x8 = 64 visual tokens, 4 LLM layers; budget 0.25 = 16 average tokens
TINY_SHAPE = CalibrationShape(64, 4, (8, 8), "llava")
GROUND_PLAN = CalibratedPlan(
    "ground",
    0.25,
    {
        **default_plan_fields(),
        "stage1_fraction": 28 / 64,
        "stage2_ratio": 12 / 28,
        "stage2_layer": 1,
        "region_size": 2,
        "top_n": 4,
        "aggregation": False,
    },
    (28, 12, 12, 12),
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def planned_runner(tiny_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("planned")
    shutil.copytree(tiny_dir, directory, dirs_exist_ok=True)
    PlanTable([GROUND_PLAN], TINY_SHAPE).save(directory)
    return load_runner(directory, device="cpu")


def _image() -> Image.Image:
    return scenes.render(scenes.evaluation_set(1, 0)[0][0].scene)


def _task(kind: str, config: PruningConfig) -> TaskRequest:
    text = "the red circle" if kind == "ground" else "What color is the circle?"
    return TaskRequest(image=_image(), kind=kind, text=text, config=config, max_new_tokens=4)


def test_the_calibration_split_is_disjoint_from_the_evaluation_set() -> None:
    # different random streams: evaluation 4s and 4s + 2 of EVAL_SEED, training odd (2s + 1)
    assert CALIBRATION_SEED != scenes.EVAL_SEED
    calibration_streams = {4 * CALIBRATION_SEED, 4 * CALIBRATION_SEED + 2}
    assert not calibration_streams & {4 * scenes.EVAL_SEED, 4 * scenes.EVAL_SEED + 2}
    assert all(stream % 2 == 0 for stream in calibration_streams)
    # and no scene in common with the whole 1,000 + 1,000-item evaluation set
    grounding, vqa = scenes.evaluation_set(1000, 1000)
    evaluation = {item.scene for item in grounding} | {item.scene for item in vqa}
    cal_grounding, cal_vqa = scenes.evaluation_set(256, 256, seed=CALIBRATION_SEED)
    calibration = {item.scene for item in cal_grounding} | {item.scene for item in cal_vqa}
    assert len(evaluation) == 2000 and len(calibration) == 512
    assert not evaluation & calibration
    items = calibration_items(3)
    assert [item.kind for item in items] == ["ground"] * 3 + ["vqa"] * 3
    assert items[0].text == cal_grounding[0].phrase and items[3].answer == cal_vqa[0].answer


def test_the_runner_applies_a_plan_exactly(planned_runner) -> None:
    ground = _task("ground", PruningConfig(method="nuwa", budget=0.25))
    answer = _task("answer", PruningConfig(method="nuwa", budget=0.25))
    paper = _task("ground", PruningConfig(method="nuwa_paper", budget=0.25))
    results, _ = planned_runner.run([ground, answer, paper])  # one mixed batch
    calibrated = results[0].report
    assert calibrated.plan == "calibrated:ground@0.25" and calibrated.method == "nuwa"
    assert calibrated.per_layer == GROUND_PLAN.per_layer  # the counts every layer really saw
    assert (calibrated.stage1, calibrated.stage2) == (28, 12)
    assert min(i for i, c in enumerate(calibrated.per_layer) if c < calibrated.stage1) == 1  # the drop layer
    assert len(calibrated.kept_stage1) == 28 and len(calibrated.kept) == 12
    assert calibrated.average == 16.0
    # no plan for VQA, and nuwa_paper never takes one: both run the paper's split
    paper_plan = plan_tokens(PruningConfig(method="nuwa", budget=0.25), 64, 4, (8, 8), "llava")
    for result in results[1:]:
        assert result.report.plan == "paper"
        assert result.report.per_layer == paper_plan.per_layer
    assert results[2].report.method == "nuwa_paper"


def test_a_calibrated_run_is_the_plan_config_run_by_hand(planned_runner) -> None:
    """The runner only swaps the config: the same config sent explicitly gives the same tokens and counts."""
    (calibrated,), _ = planned_runner.run([_task("ground", PruningConfig(method="nuwa", budget=0.25))])
    explicit = GROUND_PLAN.config(PruningConfig(method="nuwa", budget=0.25))
    (by_hand,), _ = planned_runner.run([_task("ground", explicit)])
    assert by_hand.report.plan == "custom"
    assert by_hand.raw_output == calibrated.raw_output
    assert by_hand.report.per_layer == calibrated.report.per_layer
    assert by_hand.report.kept == calibrated.report.kept


@pytest.mark.parametrize(
    "config",
    [
        PruningConfig(method="none"),
        PruningConfig(method="nuwa"),
        PruningConfig(method="nuwa", budget=1.0),
        PruningConfig(method="nuwa", budget=64),
    ],
)
def test_a_plan_never_changes_keep_all_results(planned_runner, config) -> None:
    keep_all_plan = CalibratedPlan("ground", 1.0, GROUND_PLAN.options, GROUND_PLAN.per_layer)
    table = PlanTable([GROUND_PLAN, keep_all_plan], TINY_SHAPE)
    tasks = [_task("ground", config), _task("answer", config)]
    saved = planned_runner.plans
    try:
        planned_runner.plans = table
        with_plans, _ = planned_runner.run(tasks)
        planned_runner.plans = PlanTable()
        without, _ = planned_runner.run(tasks)
    finally:
        planned_runner.plans = saved
    for a, b in zip(with_plans, without, strict=True):
        assert a.raw_output == b.raw_output and a.boxes == b.boxes
        assert a.report == b.report and a.report.plan == "paper"
        assert a.report.per_layer == (64,) * 4


def test_calibrate_searches_and_honours_the_bar_on_the_builtin_model(tmp_path) -> None:
    runner = load_runner("builtin", device="cpu")
    items = [item for item in calibration_items(8) if item.kind == "ground"]
    settings = SearchSettings(rungs=(2, 8), max_passes=1, splits_per_layer=1, batch_size=8)
    result = calibrate(runner, items, [0.25], tasks=["ground"], time_limit_s=600, settings=settings)
    assert runner.plans is not None  # restored after the search
    (plan,) = result.table.plans
    assert plan.label == "calibrated:ground@0.25" and plan.scores["items"] == 8
    assert plan.scores["calibrated"] >= plan.scores["paper"]
    assert result.table.shape == CalibrationShape(144, 8, (12, 12), "llava")
    paper = plan_tokens(PruningConfig(method="nuwa", budget=0.25), 144, 8, (12, 12), "llava").per_layer
    (search,) = result.trace
    groups = {c["group"] for c in search["candidates"]}
    if (
        plan.scores["stopped"] == "converged"
    ):  # every group was swept (scoring adds nothing to a no-drop plan)
        assert {"split", "selection", "aggregation", "salience"} <= groups
    assert groups <= {"start", "split", "selection", "aggregation", "salience", "scoring"}
    assert sum(c["paper"] for c in search["candidates"]) == 1
    for candidate in search["candidates"]:  # every scored plan met the bar
        per_layer = candidate["per_layer"]
        assert sum(per_layer) <= 36 * 8 and sum(c * c for c in per_layer) <= sum(c * c for c in paper)
        assert 0 <= candidate["correct"] <= candidate["items"] <= 8
    # a plan found is applied as planned
    runner.plans = result.table
    (ran,), _ = runner.run([TaskRequest(items[0].image, "ground", items[0].text, PruningConfig(budget=0.25))])
    assert ran.report.plan == plan.label and ran.report.per_layer == plan.per_layer


def test_the_time_bound_keeps_the_paper_split(tiny_dir) -> None:
    runner = load_runner(tiny_dir, device="cpu")
    items = calibration_items(2)
    result = calibrate(runner, items, [0.5], time_limit_s=0.0, settings=SearchSettings(rungs=(2,)))
    assert [p.scores["stopped"] for p in result.table.plans] == ["time limit", "time limit"]
    paper = plan_tokens(PruningConfig(method="nuwa", budget=0.5), 64, 4, (8, 8), "llava").per_layer
    assert all(plan.per_layer == paper for plan in result.table.plans)


def test_calibrate_cli_on_a_users_model_and_data(tiny_dir, tmp_path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    grounding, vqa = scenes.evaluation_set(2, 2, seed=CALIBRATION_SEED)
    data, _ = write_scene_jsonl(tmp_path / "calibration", grounding, vqa)
    trace = tmp_path / "trace.json"
    argv = ["--calibrate", "--model", str(model_dir), "--data", str(data), "--budgets", "0.25", "0.5"]
    retention.main([*argv, "--time-limit", "5", "--trace", str(trace), "--device", "cpu"])
    table = PlanTable.load(model_dir / PLAN_FILE_NAME)
    assert {p.label for p in table.plans} == {
        f"calibrated:{task}@{budget}" for task in ("ground", "answer") for budget in ("0.25", "0.5")
    }
    assert table.meta["data"] == str(data) and table.meta["items"] == {"ground": 2, "answer": 2}
    assert json.loads(trace.read_text())["searches"][0]["candidates"]
    assert trace.with_suffix(".png").stat().st_size > 10_000
    assert len(load_runner(model_dir, device="cpu").plans) == 4
    # recalibrating one budget keeps the other's plans
    retention.main([*argv[:-1], "--time-limit", "5", "--device", "cpu"])
    assert len(PlanTable.load(model_dir).plans) == 4


def test_the_builtin_model_ships_its_plans() -> None:
    runner = load_runner(BUILTIN_MODEL_DIR, device="cpu")
    assert {p.label for p in runner.plans.plans} >= {"calibrated:ground@0.25", "calibrated:answer@0.25"}


def test_coverage_counts_the_cells_of_each_object(planned_runner) -> None:
    from models.eval import coverage

    grounding, _ = scenes.evaluation_set(2, 0, seed=CALIBRATION_SEED)
    items = [
        (
            retention.EvalItem("ground", scenes.render(g.scene), g.phrase, box=tuple(map(float, g.box))),
            g.scene,
        )
        for g in grounding
    ]
    (result,), _ = planned_runner.run([_task("ground", PruningConfig(method="none"))])
    assert coverage.object_cells((0, 0, 168, 168), result) == {(r, c) for r in range(4) for c in range(4)}
    unpruned = coverage.measure(planned_runner, items, PruningConfig(method="none"), 2)
    assert unpruned.target_final == [1.0, 1.0] and unpruned.objects_stage1 == [1.0, 1.0]
    planned = coverage.measure(planned_runner, items, PruningConfig(method="nuwa", budget=0.25), 2)
    assert planned.plans == {"calibrated:ground@0.25"}
    assert all(0.0 <= s <= 1.0 for s in planned.target_stage1 + planned.target_final)
    assert all(f <= s for f, s in zip(planned.target_final, planned.target_stage1, strict=True))
    _, vqa = scenes.evaluation_set(0, 2, seed=CALIBRATION_SEED)
    questions = [
        (retention.EvalItem("vqa", scenes.render(v.scene), v.question, answer=v.answer), v.scene) for v in vqa
    ]
    asked = coverage.measure(planned_runner, questions, PruningConfig(method="nuwa", budget=0.25), 2)
    assert asked.plans == {"paper"}  # no VQA plan in this table
    assert asked.target_stage1 == asked.objects_stage1  # a question's target is every object
    lines = coverage.table([unpruned, planned]).splitlines()
    assert lines[2].startswith("| none | paper | ") and "| 2 of 2 |" in lines[2]

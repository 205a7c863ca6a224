"""The real service runs the built-in model's calibrated plans for `method=nuwa` and says which plan ran."""

from __future__ import annotations

import httpx
import pytest

from models.builtin import BUILTIN_MODEL_DIR
from models.plans import PlanTable
from tests.service.helpers import answer, ground, red_circle_png


@pytest.fixture(scope="module")
def plans(trained_model: bool) -> PlanTable:
    if not trained_model:
        pytest.skip("the calibrated plans belong to the committed built-in model")
    return PlanTable.for_model(BUILTIN_MODEL_DIR)


def test_nuwa_runs_the_calibrated_plan_of_the_task(client: httpx.Client, plans: PlanTable) -> None:
    for kind, send in (("ground", ground), ("answer", answer)):
        plan = plans.find(kind, 0.25, 144)
        assert plan is not None
        text = "the red circle" if kind == "ground" else "What color is the circle?"
        response = send(client, red_circle_png(), text, budget="0.25", method="nuwa")
        assert response.status_code == 200, response.text
        tokens = response.json()["visual_tokens"]
        assert tokens["plan"] == f"calibrated:{kind}@0.25" and tokens["method"] == "nuwa"
        assert (tokens["stage1"], tokens["stage2"]) == (plan.per_layer[0], plan.per_layer[-1])
        assert tokens["average"] == pytest.approx(sum(plan.per_layer) / len(plan.per_layer), abs=1e-3)


def test_the_papers_split_stays_reachable(client: httpx.Client, plans: PlanTable) -> None:
    paper = ground(client, red_circle_png(), "the red circle", budget="0.25", method="nuwa_paper").json()
    tokens = paper["visual_tokens"]
    assert (tokens["method"], tokens["plan"]) == ("nuwa_paper", "paper")
    assert (tokens["stage1"], tokens["stage2"], tokens["average"]) == (63, 9, 36.0)  # K1, K1 / 7 at layer 4
    uncalibrated = ground(client, red_circle_png(), "the red circle", budget="64", method="nuwa").json()
    assert uncalibrated["visual_tokens"]["plan"] == "paper"  # no plan for this budget: the paper's split

"""Pruning methods are one module each behind one registry: a method defined in this file plugs in everywhere.

The throw-away method `checkerboard` (every other grid cell, nothing dropped in the LLM) is registered from the
test itself: the config validator, the planner and the engine must then use it without any other edit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from models.budget import PlanShape, PruningConfig, TokenPlan, flat_plan, plan_tokens
from models.llava import LlavaAdapter
from models.methods import (
    BUILTIN_MODULES,
    PruningMethod,
    Stage1Selection,
    get_method,
    method_names,
    register_method,
    unregister_method,
)
from tests.models.tiny import tiny_llava

REPO = Path(__file__).resolve().parents[2]

torch.set_num_threads(1)


class Checkerboard(PruningMethod):
    """Keeps the cells whose row + col is even; the budget is ignored on purpose (the plan says so)."""

    name = "checkerboard"

    def plan(self, config: PruningConfig, shape: PlanShape, target: int) -> TokenPlan:
        rows, cols = shape.grid
        kept = sum(1 for row in range(rows) for col in range(cols) if (row + col) % 2 == 0)
        return flat_plan(self.name, shape.num_tokens, kept, shape.num_layers, top_n=0)

    def select(self, encoded, config: PruningConfig, plan: TokenPlan) -> Stage1Selection:
        rows, cols = encoded.grid
        index = torch.tensor(
            [row * cols + col for row in range(rows) for col in range(cols) if (row + col) % 2 == 0],
            device=encoded.features.device,
        )
        return Stage1Selection(encoded.features[index], index)


@pytest.fixture
def checkerboard() -> Iterator[Checkerboard]:
    method = register_method(Checkerboard())
    try:
        yield method
    finally:
        unregister_method(method.name)


def test_builtin_methods_are_registered_from_their_modules() -> None:
    assert method_names() == BUILTIN_MODULES
    for name in BUILTIN_MODULES:
        assert get_method(name).name == name


def test_an_unregistered_method_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValidationError, match="unknown method 'checkerboard'.*nuwa"):
        PruningConfig(method="checkerboard")
    with pytest.raises(ValueError, match="unknown method"):
        get_method("checkerboard")


def test_a_method_defined_in_a_test_plugs_into_planner_and_engine(checkerboard: Checkerboard) -> None:
    config = PruningConfig(method="checkerboard", budget=0.5)
    assert "checkerboard" in method_names()
    plan = plan_tokens(config, 64, 4, (8, 8))
    assert (plan.method, plan.stage1_tokens, plan.stage2_layer, plan.per_layer) == (
        "checkerboard",
        32,
        None,
        (32,) * 4,
    )

    adapter = LlavaAdapter(*tiny_llava())
    image = Image.new("RGB", (112, 112), (120, 60, 200))
    output = adapter.forward(adapter.prepare([image, image], ["What color?"] * 2), [config, PruningConfig()])
    report = output.reports[0]
    assert report.method == "checkerboard"
    assert report.per_layer == (32,) * adapter.num_llm_layers
    assert report.kept == tuple((row, col) for row in range(8) for col in range(8) if (row + col) % 2 == 0)
    assert output.reports[1].method == "nuwa" and output.reports[1].stage1 == 64  # batch-mates unaffected


def test_a_second_method_with_the_same_name_is_refused(checkerboard: Checkerboard) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_method(Checkerboard())


def test_after_unregistering_the_method_is_gone() -> None:
    register_method(Checkerboard())
    unregister_method("checkerboard")
    assert "checkerboard" not in method_names()
    with pytest.raises(ValidationError):
        PruningConfig(method="checkerboard")


def test_the_documented_example_method_runs() -> None:
    """docs/PRUNING.md's "Adding a method" module, executed as written, plans and prunes."""
    text = (REPO / "docs" / "PRUNING.md").read_text()
    code = text.split("# models/methods/every_other.py\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/PRUNING.md", "exec"), namespace)
    method = register_method(namespace["METHOD"])  # type: ignore[arg-type]
    try:
        plan = plan_tokens(PruningConfig(method="every_other", budget=0.5), 64, 4, (8, 8))
        assert plan.per_layer == (32,) * 4
        adapter = LlavaAdapter(*tiny_llava())
        image = Image.new("RGB", (112, 112), (10, 160, 90))
        config = PruningConfig(method="every_other", budget=0.5)
        report = adapter.forward(adapter.prepare([image], ["What color?"]), [config]).reports[0]
        assert report.kept == tuple(divmod(index, 8) for index in range(0, 64, 2))
    finally:
        unregister_method(method.name)

"""Field parsing: budgets, methods and defaults become a PruningConfig or a 422, texts a 400/422."""

from __future__ import annotations

import pytest

from service.errors import BadRequestError, ValidationFailedError
from service.parsing import build_config, parse_budget, require_text
from service.settings import Settings


def test_parse_budget_forms() -> None:
    assert parse_budget("64") == 64 and isinstance(parse_budget("64"), int)
    assert parse_budget("0.25") == 0.25
    assert parse_budget(" 128 ") == 128
    assert parse_budget(0.5) == 0.5
    assert parse_budget(None) is None
    assert parse_budget("all") is None
    for bad in ("abc", "nan", True, [1]):
        with pytest.raises(ValidationFailedError):
            parse_budget(bad)


def test_build_config_uses_request_values_then_defaults() -> None:
    settings = Settings(default_method="random", default_budget=0.5)
    config = build_config("64", "nuwa", settings)
    assert (config.method, config.budget) == ("nuwa", 64)
    config = build_config(None, None, settings)
    assert (config.method, config.budget) == ("random", 0.5)
    config = build_config("all", None, settings)
    assert config.budget is None


@pytest.mark.parametrize(
    ("budget", "method", "code"),
    [
        ("0", "nuwa", "invalid_budget"),
        ("1.5", "nuwa", "invalid_budget"),
        ("-3", "nuwa", "invalid_budget"),
        ("64", "bogus", "invalid_method"),
        ("64", 7, "invalid_method"),
    ],
)
def test_build_config_refuses_with_422(budget: object, method: object, code: str) -> None:
    with pytest.raises(ValidationFailedError) as info:
        build_config(budget, method, Settings())
    assert info.value.status_code == 422
    assert info.value.code == code


def test_require_text() -> None:
    assert require_text("  the red circle ", "phrase", 100) == "the red circle"
    with pytest.raises(BadRequestError):
        require_text(None, "phrase", 100)
    with pytest.raises(BadRequestError):
        require_text("   ", "phrase", 100)
    with pytest.raises(ValidationFailedError) as info:
        require_text("x" * 101, "phrase", 100)
    assert info.value.code == "text_too_long"

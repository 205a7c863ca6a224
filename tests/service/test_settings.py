"""Settings: NUWA_* env vars are the only source, parsed once and validated at start-up."""

from __future__ import annotations

import pickle

import pydantic
import pytest

from models.builtin import BUILTIN_MODEL_DIR
from service.settings import Settings


def test_env_vars_are_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUWA_PORT", "9123")
    monkeypatch.setenv("NUWA_API_KEYS", "k1, k2,")
    monkeypatch.setenv("NUWA_IMAGE_URL_ALLOWLIST", "img.example.com,*.cdn.org")
    monkeypatch.setenv("NUWA_DEFAULT_BUDGET", "64")
    monkeypatch.setenv("NUWA_MAX_WAIT_MS", "25")
    monkeypatch.setenv("NUWA_LOG_LEVEL", "debug")
    settings = Settings()
    assert settings.port == 9123
    assert settings.api_keys == ["k1", "k2"]
    assert settings.image_url_allowlist == ["img.example.com", "*.cdn.org"]
    assert settings.default_budget == 64 and isinstance(settings.default_budget, int)
    assert settings.max_wait_s == pytest.approx(0.025)
    assert settings.log_level == "DEBUG"


def test_defaults() -> None:
    settings = Settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.model == str(BUILTIN_MODEL_DIR)
    assert settings.api_keys == [] and settings.image_url_allowlist == []


def test_ratio_budget_and_keep_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUWA_DEFAULT_BUDGET", "0.25")
    assert Settings().default_budget == 0.25
    monkeypatch.setenv("NUWA_DEFAULT_BUDGET", "all")
    assert Settings().default_budget is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"default_method": "nope"},
        {"default_budget": 2.5},
        {"max_batch_size": 0},
        {"port": 70000},
        {"unknown": 1},
    ],
)
def test_invalid_settings_fail_at_start(kwargs: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        Settings(**kwargs)


def test_settings_survive_the_trip_to_the_worker() -> None:
    settings = Settings(max_batch_size=3, api_keys=["a"])
    assert pickle.loads(pickle.dumps(settings)) == settings

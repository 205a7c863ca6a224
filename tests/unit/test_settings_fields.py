"""Every setting is declared once and documented: a second declaration of a name silently replaces the first
(pydantic keeps the last), which is how a new worker setting once shadowed the API's `NUWA_DECODE_THREADS`."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _declared_fields() -> list[str]:
    tree = ast.parse((ROOT / "service" / "settings.py").read_text())
    settings = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Settings")
    return [
        node.target.id
        for node in settings.body
        if isinstance(node, ast.AnnAssign)
        and isinstance(node.target, ast.Name)
        and node.target.id != "model_config"
    ]


def test_no_setting_is_declared_twice() -> None:
    declared = _declared_fields()
    assert [name for name, count in Counter(declared).items() if count > 1] == []
    assert set(declared) == set(Settings.model_fields)


def test_every_setting_is_in_the_api_settings_tables() -> None:
    api = (ROOT / "docs" / "API.md").read_text()
    missing = [name for name in Settings.model_fields if f"`NUWA_{name.upper()}`" not in api]
    assert missing == []

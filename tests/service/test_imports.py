"""Imports point one way: the API process never loads torch, and models/ never imports service/ or FastAPI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_api_process_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from service.app import create_app\n"
        "import service.__main__, service.worker, service.worker_process, service.supervisor\n"
        "from service.settings import Settings\n"
        "create_app(Settings())\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_models_never_import_service_or_fastapi() -> None:
    offenders = []
    for path in sorted((REPO / "models").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {name}"
                for name in names
                if name.split(".")[0] in ("service", "fastapi", "starlette")
            ]
    assert not offenders

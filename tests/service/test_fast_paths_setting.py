"""`NUWA_FAST_PATHS=false` reaches the worker (its load log says so) and the service answers as with the default."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import ServerProcess, serving
from tests.service.helpers import ground, red_circle_png


@pytest.fixture(scope="module")
def stock_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(model_dir, tmp_path_factory.mktemp("logs"), "stock-paths", fast_paths="false") as handle:
        yield handle


def _load_lines(server: ServerProcess) -> list[str]:
    return [r.get("message", "") for r in server.log_records() if "calibrated plans" in r.get("message", "")]


def test_the_setting_reaches_the_worker_and_answers_match(
    stock_server: ServerProcess, server: ServerProcess
) -> None:
    lines = _load_lines(stock_server)
    assert lines and all(line.endswith("fast paths off") for line in lines)
    assert all(line.endswith("fast paths on") for line in _load_lines(server))
    png = red_circle_png()
    answers = []
    for handle in (stock_server, server):
        with handle.client() as client:
            response = ground(client, png, "the red circle", method="none")
            assert response.status_code == 200, response.text
            answers.append(response.json())
    stock, fast = answers
    assert stock["raw_output"] == fast["raw_output"]
    assert stock["boxes"] == fast["boxes"]

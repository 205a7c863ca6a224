"""Every request example in README.md and docs/API.md runs, as written, against the real server, and the output
the docs show is the output it gives: the docs can never again show a wrong answer as right.

How examples are written (and found):

    <!-- example: NAME -->
    ```bash
    curl ... localhost:8000/...
    ```
    <!-- output: NAME -->             (optional; `iou=x1,y1,x2,y2:0.93` also checks the first box's IoU)
    ```json
    {... what that command prints ...}
    ```

The command block runs in bash with the real `curl`, in a scratch folder that sees the repository's `examples/`,
with `localhost:8000` pointed at
a fresh server started like `make serve` (built-in model, no API key). Output blocks are JSON, or server-sent
events (`data: ...` lines). Compared exactly, except: the string "…" matches any value, and the values (not the
keys) under `timing_ms` and of `request_id`, `id`, `created`, `pid`, `busy_s`, `decode_steps` vary and are not
compared. Every bash block that talks to `localhost:8000` must be a marked example, so none escapes this test.
Examples of a file run in document order on one server, so their cache hits are as the docs show them.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from models.builtin.scenes import iou
from tests.service.conftest import ServerProcess, start_server
from tests.support.launcher import REPO

DOCUMENTS = ("README.md", "docs/API.md")
WILDCARD = "…"
VOLATILE_KEYS = frozenset({"request_id", "id", "created", "pid", "busy_s", "decode_steps", "oldest_batch_s"})
VOLATILE_SUBTREES = frozenset({"timing_ms"})
_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)
_MARKER = re.compile(r"<!--\s*(example|output):\s*([\w.-]+)([^>]*)-->")


@dataclass
class Example:
    name: str
    document: str
    command: str
    output_kind: str | None = None
    output: str | None = None
    iou_check: tuple[tuple[float, ...], float] | None = None


def examples_of(document: str) -> list[Example]:
    """The marked examples of a Markdown file, in order; raises if a curl block is not marked."""
    text = (REPO / document).read_text()
    examples: dict[str, Example] = {}
    order: list[str] = []
    for block in _BLOCK.finditer(text):
        kind, body = block.group(1), block.group(2)
        before = text[: block.start()].rstrip()
        marker = _MARKER.search(before[before.rfind("\n", 0, len(before) - 1) + 1 :]) if before else None
        if marker is None:
            if kind == "bash" and "localhost:8000" in body and "curl" in body:
                raise AssertionError(f"{document}: an unmarked request example:\n{body}")
            continue
        role, name, options = marker.group(1), marker.group(2), marker.group(3)
        if role == "example":
            examples[name] = Example(name=name, document=document, command=body)
            order.append(name)
        else:
            example = examples[name]
            example.output_kind, example.output = kind, body
            found = re.search(r"iou=([\d.,]+):([\d.]+)", options)
            if found:
                box = tuple(float(v) for v in found.group(1).split(","))
                example.iou_check = (box, float(found.group(2)))
    return [examples[name] for name in order]


def run_example(example: Example, server: ServerProcess, workdir: Path) -> str:
    command = example.command.replace("localhost:8000", server.base_url.removeprefix("http://"))
    examples = workdir / "examples"
    if not examples.exists():  # the docs' relative paths, without letting `-o` write into the repository
        examples.symlink_to(REPO / "examples")
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", command],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, (
        f"{example.document} {example.name}: exit {result.returncode}\n{result.stderr}"
    )
    return result.stdout


def matches(shown: Any, actual: Any, path: str = "") -> list[str]:
    """Where `actual` differs from what the docs show (empty: it matches)."""
    if shown == WILDCARD:
        return []
    key = path.rsplit(".", 1)[-1]
    if key in VOLATILE_KEYS:
        return []
    if isinstance(shown, dict):
        if not isinstance(actual, dict):
            return [f"{path}: shown an object, got {actual!r}"]
        problems = []
        if set(shown) != set(actual):
            problems.append(f"{path}: shown keys {sorted(shown)}, got {sorted(actual)}")
        for name in set(shown) & set(actual):
            child = f"{path}.{name}" if path else name
            if name in VOLATILE_SUBTREES:
                if isinstance(shown[name], dict) and set(shown[name]) != set(actual[name]):
                    problems.append(f"{child}: shown keys {sorted(shown[name])}, got {sorted(actual[name])}")
                continue
            problems += matches(shown[name], actual[name], child)
        return problems
    if isinstance(shown, list):
        if not isinstance(actual, list) or len(shown) != len(actual):
            return [f"{path}: shown {shown!r}, got {actual!r}"]
        return [
            p
            for i, (a, b) in enumerate(zip(shown, actual, strict=True))
            for p in matches(a, b, f"{path}[{i}]")
        ]
    if shown != actual:
        return [f"{path}: shown {shown!r}, got {actual!r}"]
    return []


def _events(text: str) -> list[Any]:
    events = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.fixture(scope="module", params=DOCUMENTS)
def document_server(
    request: pytest.FixtureRequest, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ServerProcess]]:
    """A fresh server per document, configured like `make serve` (only the port differs)."""
    handle = start_server(model_dir, tmp_path_factory.mktemp("logs"), "docs", max_new_tokens="32")
    try:
        handle.wait_for("/readyz")
        yield request.param, handle
    finally:
        handle.stop()


def test_every_documented_example_gives_the_documented_output(
    document_server: tuple[str, ServerProcess], trained_model: bool, tmp_path: Path
) -> None:
    if not trained_model:
        pytest.skip("the documented outputs were measured with the committed built-in model")
    document, server = document_server
    examples = examples_of(document)
    assert examples, f"{document} has no marked examples"
    problems: list[str] = []
    for example in examples:
        stdout = run_example(example, server, tmp_path)
        if example.output is None:
            continue
        if example.output_kind == "json":
            actual: Any = json.loads(stdout)
            shown: Any = json.loads(example.output)
        else:
            actual, shown = _events(stdout), _events(example.output)
        found = matches(shown, actual)
        problems += [f"{document} {example.name}: {p}" for p in found]
        if found:
            problems.append(f"{document} {example.name}: it printed\n{stdout}")
        if example.iou_check is not None:
            truth, value = example.iou_check
            measured = iou(actual["boxes"][0]["xyxy"], truth)
            if round(measured, 2) != value:
                problems.append(f"{document} {example.name}: IoU {measured:.3f}, the docs say {value}")
    assert not problems, "\n".join(problems)


def test_the_harness_finds_a_difference() -> None:
    """The comparison would catch a wrong box, a missing field, or an unmarked example."""
    shown = {
        "boxes": [{"xyxy": [1, 2, 3, 4]}],
        "timing_ms": {"total": 1.0},
        "request_id": "x",
        "model": WILDCARD,
    }
    same = {"boxes": [{"xyxy": [1, 2, 3, 4]}], "timing_ms": {"total": 9.0}, "request_id": "y", "model": "m"}
    assert matches(shown, same) == []
    wrong = {**same, "boxes": [{"xyxy": [1, 2, 3, 5]}]}
    assert matches(shown, wrong) == ["boxes[0].xyxy[3]: shown 4, got 5"]
    assert matches(shown, {**same, "extra": 1}) != []
    assert matches(shown, {**same, "timing_ms": {"total": 1.0, "queue": 0.0}}) != []

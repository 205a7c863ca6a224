"""`NUWA_TRACE_SPANS_FILE`: both processes stamp every request's points, in order, on the client's clock.

A real server with the setting, sequential /ground requests with their own ids (one with two phrases), then the
file as `bench/request_spans.py` reads it: every point once per request (per phrase from `dispatched` to
`delivered`), each no earlier than the one before, between the client's send and its answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.request_spans import HOPS, hop_rows, read_points
from models.builtin.scenes import render
from service import spans
from tests.service.conftest import ServerProcess, serving
from tests.service.helpers import red_circle_scene
from tests.service.images import encode

POINTS = (
    "arrived",
    "queued",
    "dispatched",
    "received",
    "decoded",
    "running",
    "done",
    "delivered",
    "responding",
)
PER_PHRASE = POINTS[2:8]


@pytest.fixture(scope="module")
def traced(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    log_dir = tmp_path_factory.mktemp("logs")
    path = log_dir / "spans.txt"
    with serving(model_dir, log_dir, "spans", trace_spans_file=str(path)) as handle:
        yield handle, path


def test_every_point_once_and_in_order_on_the_clients_clock(traced) -> None:
    server, path = traced
    png = encode(render(red_circle_scene()), "PNG")
    seen = {}
    with server.client(api_key=None) as client:
        for index in range(3):
            request_id = f"spans-test-{index}"
            sent = time.monotonic()
            response = client.post(
                "/ground",
                files={"image": ("scene.png", png, "image/png")},
                data={"phrase": "the red circle"},
                headers={"X-Request-Id": request_id},
            )
            answered = time.monotonic()
            assert response.status_code == 200, response.text
            seen[request_id] = {"sent": sent, "answered": answered, "timing_ms": response.json()["timing_ms"]}
    points = read_points(path)
    for request_id, client_side in seen.items():
        stamps = points[request_id]
        assert set(stamps) == set(POINTS)
        ordered = [client_side["sent"], *(stamps[point] for point in POINTS), client_side["answered"]]
        assert ordered == sorted(ordered), dict(zip(("sent", *POINTS, "answered"), ordered, strict=True))
    rows = hop_rows(points, seen)
    assert len(rows) == 3
    for row in rows:
        hops = sum(row[name] for name, _, _ in HOPS)
        assert hops == pytest.approx(row["client"], abs=1e-6)  # the hops tile the client's latency
        assert 0 < row["model stages"] < row["client"]
        assert row["worker: model"] > 0 and row["worker: decode"] > 0


def test_a_request_with_two_phrases_has_pipe_and_worker_points_per_phrase(traced) -> None:
    server, path = traced
    png = encode(render(red_circle_scene()), "PNG")
    with server.client(api_key=None) as client:
        response = client.post(
            "/ground",
            files={"image": ("scene.png", png, "image/png")},
            data={"phrase": ["the red circle", "the blue square"]},
            headers={"X-Request-Id": "spans-two"},
        )
    assert response.status_code == 200, response.text
    points = read_points(path)
    assert set(points["spans-two"]) == {"arrived", "queued", "responding"}
    for index in (0, 1):
        assert set(points[f"spans-two#{index}"]) == set(PER_PHRASE)
        assert points["spans-two"]["queued"] <= points[f"spans-two#{index}"]["dispatched"]
        assert points[f"spans-two#{index}"]["delivered"] <= points["spans-two"]["responding"]


def test_mark_is_a_no_op_until_configured(tmp_path: Path) -> None:
    spans.configure(None)
    spans.mark("nobody", "arrived")  # nothing configured: nothing to write to, no error
    target = tmp_path / "spans.txt"
    spans.configure(target)
    try:
        spans.mark("r1", "arrived")
        spans.mark("r1", "queued")
    finally:
        spans.configure(None)
    spans.mark("r1", "dispatched")  # after configure(None): not written
    lines = target.read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [["r1", "arrived"], ["r1", "queued"]]
    assert float(lines[0].split()[2]) <= float(lines[1].split()[2])

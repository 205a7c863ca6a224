"""The serving core over real HTTP: no idle wait, several phrases per image, the embedding cache, IPC timing,
per-batch stage metrics.

Dedicated servers (the shared one batches with a 50 ms window): one with a LONG batching window, so that any
wait an idle worker imposed would show, and one with the embedding cache off.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from models.builtin.scenes import iou
from tests.service.conftest import API_KEY, ServerProcess, serving
from tests.service.helpers import RED_CIRCLE_BOX, ground, metric, red_circle_png, scene_png, scrape

BLUE_SQUARE_BOX = (200, 40, 270, 110)  # tests/service/helpers.py red_circle_scene()


@pytest.fixture(scope="module")
def window_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Batching window of 2 s: an idle worker must still get a lone request at once."""
    with serving(
        model_dir,
        tmp_path_factory.mktemp("logs"),
        "window",
        api_keys=API_KEY,
        max_wait_ms="2000",
        max_batch_size="8",
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def uncached_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(model_dir, tmp_path_factory.mktemp("logs"), "uncached", embed_cache_mb="0") as handle:
        yield handle


def test_an_idle_worker_takes_a_lone_request_without_the_batching_window(
    window_server: ServerProcess,
) -> None:
    with window_server.client() as client:
        for seed in range(3):
            png, phrase, _ = scene_png(seed)
            response = ground(client, png, phrase)
            assert response.status_code == 200, response.text
            timing = response.json()["timing_ms"]
            assert timing["queue"] < 200, timing  # the window is 2000 ms: nothing close to it was waited
            assert timing["total"] < 2000 or timing["queue"] < 200


def test_requests_that_arrive_together_still_share_a_batch(window_server: ServerProcess) -> None:
    pngs = [scene_png(seed)[0] for seed in range(10, 16)]
    with window_server.client() as client, ThreadPoolExecutor(max_workers=6) as pool:
        responses = list(pool.map(lambda png: ground(client, png, "the red circle"), pngs))
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
    assert max(response.json()["batch_size"] for response in responses) >= 2


def test_several_phrases_run_as_one_batch_and_equal_the_one_phrase_answers(
    window_server: ServerProcess, trained_model: bool
) -> None:
    png = red_circle_png()
    phrases = ["the red circle", "the blue square", "the green triangle"]
    with window_server.client() as client:
        several = client.post(
            "/ground",
            files={"image": ("scene.png", png, "image/png")},
            data={"phrase": phrases},
        )
        assert several.status_code == 200, several.text
        body = several.json()
        singles = [ground(client, png, phrase).json() for phrase in phrases]
    assert [result["phrase"] for result in body["results"]] == phrases
    assert body["phrase"] == phrases[0] and body["boxes"] == body["results"][0]["boxes"]
    assert body["batch_size"] == 3  # all phrases in one batch
    assert [result["cache"] for result in body["results"]].count("miss") <= 1  # one vision run at most
    for result, single in zip(body["results"], singles, strict=True):
        assert result["raw_output"] == single["raw_output"]
        assert result["boxes"] == single["boxes"]
        assert result["visual_tokens"] == single["visual_tokens"]
    if trained_model:
        assert iou(body["results"][0]["boxes"][0]["xyxy"], RED_CIRCLE_BOX) >= 0.5
        assert iou(body["results"][1]["boxes"][0]["xyxy"], BLUE_SQUARE_BOX) >= 0.5


def test_several_phrases_as_a_json_array(window_server: ServerProcess) -> None:
    import base64

    image = base64.b64encode(red_circle_png()).decode()
    with window_server.client() as client:
        response = client.post(
            "/ground", json={"image": image, "phrases": ["the red circle", "the blue square"]}
        )
        assert response.status_code == 200, response.text
        assert [r["phrase"] for r in response.json()["results"]] == ["the red circle", "the blue square"]
        both = client.post("/ground", json={"image": image, "phrase": "a", "phrases": ["b"]})
        assert both.status_code == 400 and both.json()["error"]["code"] == "bad_field"
        many = client.post("/ground", json={"image": image, "phrases": ["x"] * 17})
        assert many.status_code == 422 and many.json()["error"]["code"] == "too_many_phrases"


def test_a_repeated_image_hits_the_cache_with_an_identical_answer(window_server: ServerProcess) -> None:
    png, phrase, _ = scene_png(99)
    with window_server.client() as client:
        before = scrape(client)
        first = ground(client, png, phrase, budget="0.25").json()
        second = ground(client, png, phrase, budget="0.25").json()
        after = scrape(client)
    assert (first["cache"], second["cache"]) == ("miss", "hit")
    for key in ("raw_output", "boxes", "visual_tokens", "image_size", "model_input_size"):
        assert second[key] == first[key], key
    assert second["timing_ms"]["vision"] < first["timing_ms"]["vision"]
    hits = metric(after, "nuwa_embed_cache_requests_total", result="hit")
    assert hits - metric(before, "nuwa_embed_cache_requests_total", result="hit") == 1
    assert metric(after, "nuwa_embed_cache_events_total", event="hit") >= 1
    assert metric(after, "nuwa_embed_cache_bytes") > 0
    assert metric(after, "nuwa_embed_cache_capacity_bytes") == 256 * 1024 * 1024


def test_with_the_cache_off_every_request_runs_the_vision_tower(uncached_server: ServerProcess) -> None:
    png, phrase, _ = scene_png(7)
    with uncached_server.client() as client:
        answers = [ground(client, png, phrase).json() for _ in range(2)]
        samples = scrape(client)
    assert [answer["cache"] for answer in answers] == ["miss", "miss"]
    assert answers[0]["raw_output"] == answers[1]["raw_output"]
    assert metric(samples, "nuwa_embed_cache_bytes") == 0


def test_ipc_is_timed_and_stage_seconds_are_recorded_once_per_batch(window_server: ServerProcess) -> None:
    png = red_circle_png()
    with window_server.client() as client:
        before = scrape(client)
        response = client.post(
            "/ground",
            files={"image": ("scene.png", png, "image/png")},
            data={"phrase": ["the red circle", "the blue square", "the yellow diamond"]},
        )
        assert response.status_code == 200, response.text
        after = scrape(client)
    timing = response.json()["timing_ms"]
    assert timing["ipc"] > 0
    assert set(timing) >= {
        "queue",
        "ipc",
        "image_decode",
        "preprocess",
        "wait",
        "vision",
        "prefill",
        "decode",
    }
    answered = metric(after, "nuwa_ipc_seconds_count") - metric(before, "nuwa_ipc_seconds_count")
    batches = metric(after, "nuwa_stage_seconds_count", stage="prefill") - metric(
        before, "nuwa_stage_seconds_count", stage="prefill"
    )
    assert answered == 3  # one per phrase
    assert batches == 1  # the three phrases ran as one batch: its stages are recorded once


def test_a_12_megapixel_jpeg_travels_encoded(window_server: ServerProcess) -> None:
    """The API never decodes it: the worker decodes it bounded by what the model reads."""
    import io

    from models.builtin.scenes import render
    from tests.service.helpers import red_circle_scene

    big = render(red_circle_scene()).resize((4000, 3000))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG", quality=90)
    with window_server.client(timeout=120) as client:
        response = client.post(
            "/ground",
            files={"image": ("big.jpg", buffer.getvalue(), "image/jpeg")},
            data={"phrase": "the red circle"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image_size"] == [4000, 3000] and body["model_input_size"] == [336, 336]
    x1, y1, x2, y2 = body["boxes"][0]["xyxy"] if body["boxes"] else (0, 0, 4000, 3000)
    assert 0 <= x1 < x2 <= 4000 and 0 <= y1 < y2 <= 3000


def test_readyz_reports_the_load(window_server: ServerProcess) -> None:
    with httpx.Client(base_url=window_server.base_url) as client:
        body = client.get("/readyz").json()
    assert body["ready"] is True
    assert set(body["load"]) == {
        "queued_requests",
        "queued_visual_tokens",
        "batches_in_worker",
        "requests_in_worker",
        "oldest_batch_s",
    }


@pytest.fixture(scope="module")
def follow_up_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default batching settings (10 ms window, pipeline depth 2, max batch 8, the follow-up hold on), and two
    decode threads in the worker (`NUWA_WORKER_DECODE_THREADS`; the default on a 2-CPU machine is one)."""
    with serving(
        model_dir,
        tmp_path_factory.mktemp("logs"),
        "follow-ups",
        embed_cache_mb="0",
        hold_for_follow_ups="true",
        worker_decode_threads="2",
    ) as handle:
        yield handle


def _closed_loop_batch_sizes(
    server: ServerProcess, clients: int, per_client: int, first_seed: int
) -> list[int]:
    """`clients` closed-loop clients, each sending its next request when its answer arrives; every batch size."""
    sizes: list[int] = []
    # Rendered before any client starts: a client that draws its next scene between answers comes back late on a
    # busy machine (four threads sharing the GIL), and late arrivals switch the hold off; the test is about the
    # scheduler, not the test's own drawing speed.
    scenes = [scene_png(first_seed + index)[:2] for index in range(clients * per_client)]

    def client_loop(number: int) -> None:
        with server.client(timeout=120) as client:
            for index in range(per_client):
                png, phrase = scenes[number * per_client + index]
                response = ground(client, png, phrase)
                assert response.status_code == 200, response.text
                sizes.append(response.json()["batch_size"])

    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client_loop, range(clients)))
    return sizes


def test_closed_loop_clients_are_not_split_into_alternating_small_batches(
    follow_up_server: ServerProcess,
) -> None:
    """`NUWA_HOLD_FOR_FOLLOW_UPS=true`, four closed-loop clients: once the scheduler has seen them come back, they
    share batches of about four (without the hold, pipelining splits them into alternating pairs: mean 2.5 measured
    in the same setting)."""
    _closed_loop_batch_sizes(follow_up_server, clients=4, per_client=6, first_seed=500)  # learn
    sizes = _closed_loop_batch_sizes(follow_up_server, clients=4, per_client=10, first_seed=600)
    assert sum(sizes) / len(sizes) >= 3.0, sizes


def test_a_batch_decoded_by_two_threads_answers_each_request_about_its_own_image(
    follow_up_server: ServerProcess,
) -> None:
    """Eight different scenes at once: batched, their images decoded two at a time, and every answer is about its
    own image (a mix-up between items would put the boxes on the wrong scenes)."""
    scenes = [scene_png(700 + index) for index in range(8)]
    with follow_up_server.client(timeout=120) as client, ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda scene: ground(client, scene[0], scene[1]), scenes))
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
    bodies = [response.json() for response in responses]
    assert max(body["batch_size"] for body in bodies) > 1
    overlaps = [
        iou(body["boxes"][0]["xyxy"], scene[2]) if body["boxes"] else 0.0
        for body, scene in zip(bodies, scenes, strict=True)
    ]
    assert sum(overlap >= 0.5 for overlap in overlaps) >= 7, overlaps
    messages = [record.get("message", "") for record in follow_up_server.log_records()]
    assert any("2 decode threads" in message for message in messages)

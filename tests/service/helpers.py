"""Shared helpers of the HTTP tests: contract scenes, request shortcuts, metric scraping."""

from __future__ import annotations

import random
from typing import Any

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models.builtin.scenes import Scene, SceneObject, make_grounding_item, render
from tests.service.images import encode

RED_CIRCLE_BOX = (48, 64, 128, 144)


def red_circle_scene(size: int = 336) -> Scene:
    """A contract scene (specs/scenes.md) with exactly one red circle among other shapes."""
    scale = size / 336
    objects = (
        ("red", "circle", RED_CIRCLE_BOX),
        ("blue", "square", (200, 40, 270, 110)),
        ("green", "triangle", (180, 200, 250, 270)),
        ("yellow", "diamond", (40, 220, 100, 280)),
    )
    return Scene(
        size=size,
        background=(236, 232, 226),
        objects=tuple(
            SceneObject(color, shape, tuple(round(v * scale) for v in box))  # type: ignore[arg-type]
            for color, shape, box in objects
        ),
    )


def scene_png(seed: int, size: int = 336) -> tuple[bytes, str, tuple[int, int, int, int]]:
    """A random contract grounding item: (PNG bytes, phrase, target box)."""
    item = make_grounding_item(random.Random(seed), size)
    return encode(render(item.scene)), item.phrase, item.box


def red_circle_png() -> bytes:
    return encode(render(red_circle_scene()))


def ground(client: httpx.Client, image: bytes, phrase: str, **fields: Any) -> httpx.Response:
    """POST /ground as multipart/form-data (query parameters go in `params`)."""
    params = fields.pop("params", None)
    headers = fields.pop("headers", None)
    data = {"phrase": phrase, **{k: str(v) for k, v in fields.items()}}
    return client.post(
        "/ground",
        files={"image": ("image.png", image, "image/png")},
        data=data,
        params=params,
        headers=headers,
    )


def answer(client: httpx.Client, image: bytes, question: str, **fields: Any) -> httpx.Response:
    data = {"question": question, **{k: str(v) for k, v in fields.items()}}
    return client.post("/answer", files={"image": ("image.png", image, "image/png")}, data=data)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is the documented error JSON with this status (and code), carrying the request id."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    if code is not None:
        assert error["code"] == code, error
    return error


def scrape(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def sample_image(size: tuple[int, int], colour: tuple[int, int, int] = (230, 230, 230)) -> Image.Image:
    return Image.new("RGB", size, colour)

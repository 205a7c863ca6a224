"""Every endpoint and every client-caused error status, asserted on status code AND body, over real HTTP."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from models.builtin.scenes import iou
from tests.service.conftest import ServerProcess
from tests.service.helpers import RED_CIRCLE_BOX, answer, assert_error, ground, red_circle_png
from tests.service.images import encode, png_header_only

TIMING_KEYS = {
    "queue",
    "ipc",
    "image_decode",
    "preprocess",
    "wait",
    "vision",
    "prune",
    "prefill",
    "decode",
    "total",
}
TOKEN_KEYS = {"original", "stage1", "stage2", "average", "budget", "method", "plan"}


def _check_common(body: dict, image_size: list[int]) -> None:
    assert body["model"]
    assert body["image_size"] == image_size
    assert body["model_input_size"] == [336, 336]
    assert set(body["visual_tokens"]) == TOKEN_KEYS
    assert set(body["timing_ms"]) == TIMING_KEYS
    assert all(value >= 0 for value in body["timing_ms"].values())
    assert body["timing_ms"]["total"] >= body["timing_ms"]["queue"]
    assert body["batch_size"] >= 1
    assert isinstance(body["raw_output"], str)


def test_ground_multipart(client: httpx.Client, trained_model: bool) -> None:
    response = ground(client, red_circle_png(), "the red circle", budget=64, method="nuwa")
    assert response.status_code == 200, response.text
    body = response.json()
    _check_common(body, [336, 336])
    assert body["phrase"] == "the red circle"
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["visual_tokens"]["original"] == 144
    assert body["visual_tokens"]["budget"] == 64 and body["visual_tokens"]["method"] == "nuwa"
    assert "kept_tokens" not in body
    for box in body["boxes"]:
        x1, y1, x2, y2 = box["xyxy"]
        assert 0 <= x1 < x2 <= 336 and 0 <= y1 < y2 <= 336
        assert box["xyxy_norm"] == pytest.approx([x1 / 336, y1 / 336, x2 / 336, y2 / 336], abs=1e-6)
    if trained_model:  # the committed model finds the red circle at 64 of 144 tokens (measured)
        assert body["boxes"], body["raw_output"]
        assert iou(body["boxes"][0]["xyxy"], RED_CIRCLE_BOX) >= 0.5, body["boxes"][0]["xyxy"]


def test_ground_json_with_base64_and_data_url(client: httpx.Client) -> None:
    png = red_circle_png()
    plain = base64.b64encode(png).decode()
    for image in (plain, f"data:image/png;base64,{plain}"):
        response = client.post("/ground", json={"image": image, "phrase": "the red circle", "budget": 0.5})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["visual_tokens"]["budget"] == 0.5
        assert body["phrase"] == "the red circle"


def test_answer(client: httpx.Client, trained_model: bool) -> None:
    response = answer(client, red_circle_png(), "What shape is the red object?", budget=32)
    assert response.status_code == 200, response.text
    body = response.json()
    _check_common(body, [336, 336])
    assert body["question"] == "What shape is the red object?"
    assert isinstance(body["answer"], str)
    assert "boxes" not in body
    if trained_model:
        assert body["answer"] == "circle"
        for question, expected in (("What color is the circle?", "red"), ("Is there a blue square?", "yes")):
            assert answer(client, red_circle_png(), question).json()["answer"] == expected


def test_include_kept_tokens(client: httpx.Client) -> None:
    response = ground(
        client, red_circle_png(), "the red circle", budget=32, params={"include": "kept_tokens"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    kept = body["kept_tokens"]
    tokens = body["visual_tokens"]
    assert kept["grid"] == [12, 12]
    assert len(kept["stage1"]) == tokens["stage1"] and len(kept["stage2"]) == tokens["stage2"]
    assert tokens["stage2"] < tokens["stage1"] < tokens["original"]
    assert set(map(tuple, kept["stage2"])) <= set(map(tuple, kept["stage1"]))
    assert all(0 <= r < 12 and 0 <= c < 12 for r, c in kept["stage1"])


def test_render_png_by_query_and_by_accept(client: httpx.Client) -> None:
    original = Image.open(io.BytesIO(red_circle_png())).convert("RGB")
    for kwargs in ({"params": {"render": "png"}}, {"headers": {"Accept": "image/png"}}):
        response = ground(client, red_circle_png(), "the red circle", budget=16, **kwargs)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        rendered = Image.open(io.BytesIO(response.content)).convert("RGB")
        assert rendered.size == original.size
        # kept tokens are shaded, so the picture differs from the input, but only partly (16 of 144 cells kept)
        diff = sum(1 for a, b in zip(rendered.getdata(), original.getdata(), strict=True) if a != b)
        assert 0 < diff < rendered.size[0] * rendered.size[1]


def test_chat_completions(client: httpx.Client, trained_model: bool) -> None:
    url = "data:image/png;base64," + base64.b64encode(red_circle_png()).decode()
    request = {
        "model": "whatever",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What color is the circle?"},
                ],
            },
        ],
        "max_tokens": 50,  # capped by NUWA_MAX_NEW_TOKENS=8
        "temperature": 0,
        "nuwa": {"budget": 0.25, "method": "random"},
    }
    response = client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["image_tokens_before_pruning"] == 144
    assert usage["image_tokens_after_pruning"] == 36  # 25% of 144, random keeps a flat count
    assert 1 <= usage["completion_tokens"] <= 8
    assert (choice["finish_reason"] == "length") == (usage["completion_tokens"] == 8)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_before_pruning"] - usage["prompt_tokens"] == 144 - 36
    if trained_model:  # "red" and EOS, even with a quarter of the visual tokens chosen at random
        assert choice["message"]["content"] == "red"
        assert usage["completion_tokens"] == 2 and choice["finish_reason"] == "stop"
    nuwa = body["nuwa"]
    assert nuwa["visual_tokens"]["method"] == "random" and nuwa["visual_tokens"]["budget"] == 0.25
    assert set(nuwa["timing_ms"]) == TIMING_KEYS


def test_models_and_docs(client: httpx.Client) -> None:
    models = client.get("/v1/models")
    assert models.status_code == 200
    body = models.json()
    assert body["object"] == "list" and len(body["data"]) == 1 and body["data"][0]["object"] == "model"
    assert body["data"][0]["id"] == client.get("/readyz").json()["model"]
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    for path in (
        "/ground",
        "/answer",
        "/v1/chat/completions",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in schema["paths"]
    assert "ImageUrl" in schema["components"]["schemas"]


def test_health_and_readiness(client: httpx.Client) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["worker"]["state"] == "ready"
    assert body["worker"]["device_check"] == body["worker"]["device"] == "cpu"
    assert isinstance(body["worker"]["pid"], int)
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_request_id_is_echoed(client: httpx.Client) -> None:
    response = ground(
        client, red_circle_png(), "the red circle", budget=16, headers={"X-Request-Id": "client-id-42"}
    )
    assert response.headers["x-request-id"] == "client-id-42"
    assert response.json()["request_id"] == "client-id-42"
    error = client.get("/ground-nowhere", headers={"X-Request-Id": "client-id-43"})
    assert assert_error(error, 404, "not_found")["request_id"] == "client-id-43"
    generated = client.get("/readyz").headers["x-request-id"]
    assert len(generated) == 32


# ----------------------------------------------------------------------------------------------- errors


def test_400_missing_and_malformed_fields(client: httpx.Client) -> None:
    png = red_circle_png()
    assert_error(client.post("/ground", files={"image": ("a.png", png, "image/png")}), 400, "missing_field")
    assert_error(client.post("/ground", files={"x": ("a", b"1")}, data={"phrase": "a"}), 400, "missing_field")
    assert_error(ground(client, png, "   "), 400, "missing_field")
    assert_error(client.post("/answer", json={"image": base64.b64encode(png).decode()}), 400, "missing_field")
    assert_error(
        client.post("/ground", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "invalid_json",
    )
    assert_error(client.post("/ground", json=["a list"]), 400, "invalid_json")
    assert_error(client.post("/ground", json={"image": "@@not-base64@@", "phrase": "a"}), 400, "bad_image")
    assert_error(client.post("/ground", json={"image": 42, "phrase": "a"}), 400, "bad_image")
    assert_error(
        client.post("/ground", json={"image": "https://example.com/a.png", "phrase": "a"}),
        400,
        "url_fetch_disabled",
    )
    assert_error(ground(client, png, "a", headers={"X-Request-Timeout": "soon"}), 400, "bad_header")


def test_400_chat_requests(client: httpx.Client) -> None:
    url = "data:image/png;base64," + base64.b64encode(red_circle_png()).decode()
    image_part = {"type": "image_url", "image_url": {"url": url}}
    no_image = {"messages": [{"role": "user", "content": "hello"}]}
    assert_error(client.post("/v1/chat/completions", json=no_image), 400, "image_count")
    two_images = {
        "messages": [{"role": "user", "content": [image_part, image_part, {"type": "text", "text": "a"}]}]
    }
    assert_error(client.post("/v1/chat/completions", json=two_images), 400, "image_count")
    no_text = {"messages": [{"role": "user", "content": [image_part]}]}
    assert_error(client.post("/v1/chat/completions", json=no_text), 400, "missing_field")
    several = {
        "messages": [{"role": "user", "content": [image_part, {"type": "text", "text": "a"}]}],
        "n": 2,
    }
    assert_error(client.post("/v1/chat/completions", json=several), 400, "bad_field")
    assert_error(client.post("/v1/chat/completions", json={"messages": "nope"}), 400, "bad_request")
    remote = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}},
                    {"type": "text", "text": "a"},
                ],
            }
        ]
    }
    assert_error(client.post("/v1/chat/completions", json=remote), 400, "url_fetch_disabled")


def test_401_without_or_with_a_wrong_key(server: ServerProcess) -> None:
    png = red_circle_png()
    with server.client(api_key=None) as anonymous:
        response = ground(anonymous, png, "the red circle")
        assert_error(response, 401, "missing_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_error(anonymous.get("/v1/models"), 401, "missing_api_key")
        assert anonymous.get("/healthz").status_code == 200  # probes and metrics stay open
        assert anonymous.get("/metrics").status_code == 200
    with server.client(api_key="wrong-key") as wrong:
        assert_error(ground(wrong, png, "the red circle"), 401, "invalid_api_key")
        assert_error(wrong.post("/v1/chat/completions", json={}), 401, "invalid_api_key")


def test_413_body_and_pixel_limits(client: httpx.Client) -> None:
    big_body = b"\0" * 2_100_000  # NUWA_MAX_BODY_BYTES=2000000 on this server
    response = client.post("/ground", files={"image": ("a.png", big_body, "image/png")}, data={"phrase": "a"})
    assert_error(response, 413, "body_too_large")
    too_many_pixels = encode(Image.new("RGB", (2100, 2000), (200, 200, 200)))  # 4.2 MP > 4 MP, small file
    assert len(too_many_pixels) < 2_000_000
    assert_error(ground(client, too_many_pixels, "a"), 413, "image_too_large")
    bomb = png_header_only(60_000, 60_000)  # 3.6 gigapixels claimed by a ~100-byte file
    error = assert_error(ground(client, bomb, "a"), 413, "image_too_large")
    assert "3600000000" in error["message"]


def test_413_chunked_body_is_cut_off(client: httpx.Client) -> None:
    def chunks():  # no Content-Length: the limit must hold while streaming
        for _ in range(30):
            yield b"x" * 100_000

    response = client.post("/ground", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, "body_too_large")


def test_415_unsupported_types(client: httpx.Client) -> None:
    tiff = encode(Image.new("RGB", (16, 16)), "TIFF")
    assert_error(ground(client, tiff, "a"), 415, "unsupported_image_type")
    assert_error(ground(client, b"hello, not an image", "a"), 415, "unsupported_image_type")
    response = client.post("/ground", content=b"phrase=a", headers={"content-type": "text/plain"})
    assert_error(response, 415, "unsupported_content_type")


def test_422_validation(client: httpx.Client) -> None:
    png = red_circle_png()
    assert_error(ground(client, png, "a", budget="0"), 422, "invalid_budget")
    assert_error(ground(client, png, "a", budget="1.5"), 422, "invalid_budget")
    assert_error(ground(client, png, "a", budget="lots"), 422, "invalid_budget")
    assert_error(ground(client, png, "a", method="fastest"), 422, "invalid_method")
    assert_error(ground(client, png, "x" * 201), 422, "text_too_long")  # NUWA_MAX_PHRASE_CHARS=200
    assert_error(ground(client, png, "a", params={"render": "gif"}), 422, "invalid_render")
    assert_error(ground(client, png, "a", params={"include": "everything"}), 422, "invalid_include")
    chat = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()},
                    },
                    {"type": "text", "text": "a"},
                ],
            }
        ],
        "nuwa": {"method": "nope"},
    }
    assert_error(client.post("/v1/chat/completions", json=chat), 422, "invalid_method")


def test_504_deadline_from_header(client: httpx.Client) -> None:
    response = ground(client, red_circle_png(), "the red circle", headers={"X-Request-Timeout": "0.0005"})
    error = assert_error(response, 504, "deadline_exceeded")
    assert "deadline" in error["message"]

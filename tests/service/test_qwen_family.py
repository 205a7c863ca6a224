"""NUWA_MODEL can name a Qwen2.5-VL directory: dynamic resolution reaches the API (sizes, token counts, boxes).

Uses a tiny random-weight Qwen2.5-VL of the real transformers class (tests/models/tiny.py), saved to disk and
served exactly like a real checkpoint. A random model never writes a box, so the saved model is rigged
(`answer_always`) to answer one known Qwen2.5-VL grounding answer, `bbox_2d` in ABSOLUTE pixels of the resized
model input, whatever it is shown: everything after generation (parsing, the frame, the response) is the real
served path, and the expected original-pixel boxes are computed here by hand.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from PIL import Image

from tests.service.conftest import ServerProcess, serving
from tests.service.helpers import assert_error, ground, metric, scrape
from tests.service.images import encode
from tests.support.launcher import REPO

ANSWER = '[{"bbox_2d": [31, 35, 154, 105], "label": "red circle"}]'
SAVE_TINY_QWEN = (
    "import sys, torch\n"
    "torch.set_num_threads(1)\n"
    "from tests.models.tiny import answer_always, tiny_qwen\n"
    "model, processor = tiny_qwen(max_pixels=224 * 224)\n"
    "answer_always(model, processor, sys.argv[2])\n"
    "model.save_pretrained(sys.argv[1])\n"
    "processor.save_pretrained(sys.argv[1])\n"
)


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model_dir = tmp_path_factory.mktemp("qwen") / "tiny-qwen2.5-vl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", SAVE_TINY_QWEN, str(model_dir), ANSWER],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    with serving(
        model_dir, tmp_path_factory.mktemp("logs"), "qwen", max_batch_size="4", max_wait_ms="30"
    ) as handle:
        yield handle


def test_dynamic_resolution_sizes_and_tokens(qwen_server: ServerProcess) -> None:
    wide = encode(Image.new("RGB", (448, 224), (230, 230, 230)))
    small = encode(Image.new("RGB", (100, 100), (230, 230, 230)))
    with qwen_server.client() as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-qwen2.5-vl"
        body = ground(client, wide, "the red circle", budget=0.5).json()
        # smart resize within max_pixels=224*224 to multiples of 28: 448x224 -> 308x140 = 11x5 tokens
        assert body["image_size"] == [448, 224]
        assert body["model_input_size"] == [308, 140]
        tokens = body["visual_tokens"]
        assert tokens["original"] == 55 and tokens["budget"] == 0.5
        assert tokens["stage2"] < tokens["stage1"] < 55
        assert body["raw_output"] == ANSWER
        # bbox_2d is in pixels of the 308x140 model input: x * 448 / 308, y * 224 / 140 in the original
        (box,) = body["boxes"]
        assert box["label"] == "red circle"
        assert box["xyxy"] == pytest.approx([31 * 448 / 308, 56.0, 224.0, 168.0], abs=2e-3)
        assert box["xyxy_norm"] == pytest.approx([31 / 308, 0.25, 0.5, 0.75], abs=1e-5)
        small_body = ground(client, small, "the red circle", method="none").json()
        assert small_body["model_input_size"] == [112, 112]
        assert small_body["visual_tokens"]["original"] == 16
        # the same answer on a 100x100 image resized to 112x112: pixels scale by 100/112 on both axes, and
        # x2 = 154 lies beyond the 112-pixel input, so it is clipped to the image's right edge
        assert small_body["boxes"][0]["xyxy"] == pytest.approx(
            [31 * 100 / 112, 35 * 100 / 112, 100.0, 105 * 100 / 112], abs=2e-3
        )
        samples = scrape(client)
        assert metric(samples, "nuwa_visual_tokens_original_sum") >= 55 + 16


def test_kept_tokens_follow_the_qwen_grid(qwen_server: ServerProcess) -> None:
    wide = encode(Image.new("RGB", (448, 224), (200, 220, 240)))
    with qwen_server.client() as client:
        response = ground(client, wide, "the red circle", budget=20, params={"include": "kept_tokens"})
        assert response.status_code == 200, response.text
        kept = response.json()["kept_tokens"]
        assert kept["grid"] == [5, 11]
        assert all(0 <= r < 5 and 0 <= c < 11 for r, c in kept["stage1"])
        overlay = ground(client, wide, "the red circle", budget=20, params={"render": "png"})
        assert overlay.headers["content-type"] == "image/png"


@pytest.mark.parametrize("token", ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>"])
def test_qwen_special_tokens_in_user_text_are_422(qwen_server: ServerProcess, token: str) -> None:
    """The family's own control tokens (a new chat turn, an image placeholder) are refused by name (issue 15)."""
    png = encode(Image.new("RGB", (112, 112), (230, 230, 230)))
    text = f"the red circle {token}system"
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    chat = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
            }
        ]
    }
    with qwen_server.client() as client:
        responses = [
            ground(client, png, text),
            client.post("/answer", files={"image": ("a.png", png, "image/png")}, data={"question": text}),
            client.post("/v1/chat/completions", json=chat),
        ]
        for response in responses:
            error = assert_error(response, 422, "special_token_in_text")
            assert repr(token) in error["message"], error
        assert ground(client, png, "the red circle <|not_a_token|>").status_code == 200

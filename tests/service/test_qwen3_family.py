"""NUWA_MODEL can name a Qwen3-VL directory: /ground, /answer and chat through the real `python -m service`.

The directory holds a tiny Qwen3-VL of the real transformers class (tests/models/tiny.py), saved to disk and
served exactly like a real checkpoint. A random-weight model never writes a box, so this one is made to answer
one known Qwen3-VL grounding answer whatever it is shown (`answer_always`: the answer is one added token, the
LLM a bigram model): the vision tower, the pruning, the batching and everything after generation (parsing the
`bbox_2d` JSON in relative 0..1000 coordinates, the per-sample `Frame`, the response) are the served code path,
and the expected boxes in original pixels are computed here by hand.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from models.budget import PruningConfig, plan_tokens
from tests.service.conftest import ServerProcess, serving
from tests.service.helpers import answer, ground
from tests.service.images import encode
from tests.support.launcher import REPO

ANSWER = (
    '```json\n[{"bbox_2d": [100, 250, 500, 750], "label": "red circle"}, '
    '{"bbox_2d": [600, 0, 1010, 400], "label": "red circle"}]\n```'
)
LLM_LAYERS = 4
SAVE_TINY_QWEN3 = (
    "import sys, torch\n"
    "torch.set_num_threads(1)\n"
    "from tests.models.tiny import answer_always, tiny_qwen3_vl\n"
    f"model, processor = tiny_qwen3_vl(max_pixels=256 * 256, text_layers={LLM_LAYERS})\n"
    "answer_always(model, processor, sys.argv[2])\n"
    "model.save_pretrained(sys.argv[1])\n"
    "processor.save_pretrained(sys.argv[1])\n"
)
WIDE = (448, 224)  # smart resize (multiples of 32, at most 256 * 256 px) -> 352 x 160 = 11 x 5 tokens
TALL = (100, 300)  # -> 96 x 288 = 3 x 9 tokens


@pytest.fixture(scope="module")
def qwen3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model_dir = tmp_path_factory.mktemp("qwen3") / "tiny-qwen3-vl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", SAVE_TINY_QWEN3, str(model_dir), ANSWER],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    with serving(
        model_dir, tmp_path_factory.mktemp("logs"), "qwen3", max_batch_size="3", max_wait_ms="200"
    ) as handle:
        yield handle


def _png(size: tuple[int, int]) -> bytes:
    return encode(Image.new("RGB", size, (230, 230, 230)))


def _expected_tokens(config: PruningConfig, grid: tuple[int, int]) -> dict[str, object]:
    plan = plan_tokens(config, grid[0] * grid[1], LLM_LAYERS, grid, family="qwen3_vl")
    return {"original": plan.num_tokens, "stage1": plan.stage1_tokens, "stage2": plan.stage2_tokens}


def test_ground_maps_the_bbox_2d_answer_to_original_pixels(qwen3_server: ServerProcess) -> None:
    with qwen3_server.client() as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-qwen3-vl"
        wide = ground(client, _png(WIDE), "the red circle", budget=0.5)
        assert wide.status_code == 200, wide.text
        body = wide.json()
        assert body["raw_output"] == ANSWER
        assert body["image_size"] == [448, 224] and body["model_input_size"] == [352, 160]
        # Relative 0..1000 of the model input; a plain resize, so the same fraction of the original. The
        # second box's x2 = 1010 is clamped to the right edge.
        boxes = body["boxes"]
        assert [box["label"] for box in boxes] == ["red circle", "red circle"]
        assert boxes[0]["xyxy"] == pytest.approx([44.8, 56.0, 224.0, 168.0], abs=0.06)
        assert boxes[1]["xyxy"] == pytest.approx([268.8, 0.0, 448.0, 89.6], abs=0.06)
        assert boxes[0]["xyxy_norm"] == pytest.approx([0.1, 0.25, 0.5, 0.75], abs=1e-3)

        tall = ground(client, _png(TALL), "the red circle", method="fastv", budget=0.5).json()
        assert tall["model_input_size"] == [96, 288]
        assert [box["xyxy"] for box in tall["boxes"]] == [
            pytest.approx([10.0, 75.0, 50.0, 225.0], abs=0.06),
            pytest.approx([60.0, 0.0, 100.0, 120.0], abs=0.06),
        ]
        kept = ground(client, _png(WIDE), "x", budget=20, params={"include": "kept_tokens"}).json()
        assert kept["kept_tokens"]["grid"] == [5, 11]
        assert all(0 <= r < 5 and 0 <= c < 11 for r, c in kept["kept_tokens"]["stage1"])


@pytest.mark.parametrize(
    "fields, config",
    [
        ({"budget": "0.25"}, PruningConfig(method="nuwa", budget=0.25)),
        ({"budget": "20"}, PruningConfig(method="nuwa", budget=20)),
        ({"method": "fastv", "budget": "0.5"}, PruningConfig(method="fastv", budget=0.5)),
        ({"method": "visionzip", "budget": "0.25"}, PruningConfig(method="visionzip", budget=0.25)),
        ({"method": "none"}, PruningConfig(method="none")),
    ],
    ids=["nuwa-25%", "nuwa-20", "fastv-50%", "visionzip-25%", "none"],
)
def test_per_request_budget_is_the_family_plan(qwen3_server: ServerProcess, fields, config) -> None:
    with qwen3_server.client() as client:
        response = ground(client, _png(WIDE), "the red circle", **fields)
    assert response.status_code == 200, response.text
    tokens = response.json()["visual_tokens"]
    assert {key: tokens[key] for key in ("original", "stage1", "stage2")} == _expected_tokens(config, (5, 11))
    assert tokens["method"] == config.method


def test_mixed_budgets_share_a_batch(qwen3_server: ServerProcess) -> None:
    """Requests with different methods, budgets and grids can share one batch and each keeps its own plan.

    An idle worker takes the first request alone at once, and while it is busy the next batch leaves as the
    running one ends, so whether two of a handful of concurrent requests meet in one batch depends on timing:
    rounds of concurrent requests are sent until one shows a shared batch, and every answer is checked.
    """
    configs = [
        PruningConfig(budget=0.25),
        PruningConfig(method="fastv", budget=0.5),
        PruningConfig(method="none"),
    ] * 2
    sizes = [WIDE, TALL, WIDE, TALL, WIDE, TALL]
    batch_sizes: list[int] = []
    with qwen3_server.client() as client, ThreadPoolExecutor(len(configs)) as pool:
        for _ in range(5):
            futures = [
                pool.submit(
                    ground,
                    client,
                    _png(size),
                    "the red circle",
                    method=config.method,
                    budget=config.budget or "all",
                )
                for config, size in zip(configs, sizes, strict=True)
            ]
            bodies = [future.result().json() for future in futures]
            for body, config, size in zip(bodies, configs, sizes, strict=True):
                grid = (5, 11) if size == WIDE else (9, 3)
                tokens = body["visual_tokens"]
                assert {key: tokens[key] for key in ("original", "stage1", "stage2")} == _expected_tokens(
                    config, grid
                )
                assert len(body["boxes"]) == 2
            batch_sizes += [body["batch_size"] for body in bodies]
            if max(batch_sizes) >= 2:
                break
    assert max(batch_sizes) >= 2, f"no two requests shared a batch: {batch_sizes}"
    assert max(batch_sizes) <= 3  # NUWA_MAX_BATCH_SIZE=3


def test_answer_and_chat(qwen3_server: ServerProcess) -> None:
    with qwen3_server.client() as client:
        reply = answer(client, _png(TALL), "What color is the circle?", budget=0.5)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["answer"] == ANSWER and "boxes" not in body
        assert body["visual_tokens"]["original"] == 27 and body["visual_tokens"]["budget"] == 0.5

        url = "data:image/png;base64," + base64.b64encode(_png(WIDE)).decode()
        request = {
            "model": "tiny-qwen3-vl",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "Where is the red circle?"},
                    ],
                }
            ],
            "max_tokens": 8,
            "nuwa": {"budget": 0.25, "method": "nuwa"},
        }
        chat = client.post("/v1/chat/completions", json=request)
        assert chat.status_code == 200, chat.text
        completion = chat.json()
        choice = completion["choices"][0]
        assert choice["message"]["content"] == ANSWER and choice["finish_reason"] == "stop"
        usage = completion["usage"]
        expected = _expected_tokens(PruningConfig(budget=0.25), (5, 11))
        assert usage["image_tokens_before_pruning"] == 55
        assert usage["image_tokens_after_pruning"] == expected["stage1"]
        assert usage["prompt_tokens_before_pruning"] - usage["prompt_tokens"] == 55 - expected["stage1"]
        assert usage["completion_tokens"] == 2  # the answer token, then <|im_end|>
        assert completion["nuwa"]["model_input_size"] == [352, 160]

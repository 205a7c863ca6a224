"""Loading a saved checkpoint directory offline and running tasks through `ModelRunner` (both families)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from models.budget import PruningConfig
from models.loading import load_runner, resolve_model_dir
from models.tasks import TaskRequest
from tests.models.tiny import tiny_llava, tiny_qwen

torch.set_num_threads(1)


def _to_original(runner, box_norm, size):
    """A box in 0..1 of the model input -> original pixels, clipped to the image, as the runner maps answers."""
    frame = runner.frame_for(size)
    return frame.clip(frame.to_original(box_norm))


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def runner(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model, processor = tiny_llava() if request.param == "llava" else tiny_qwen()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return load_runner(directory, device="cpu")


def test_loads_the_family_from_config(runner):
    assert runner.adapter.family in ("llava", "qwen2_5_vl")
    assert runner.device == "cpu"
    expected = "qwen2_5_vl_json" if runner.adapter.family == "qwen2_5_vl" else "llava_norm"
    assert runner.box_format == expected


def test_run_mixed_batch(runner):
    image_a = Image.new("RGB", (160, 96), (230, 230, 230))
    image_b = Image.new("RGB", (96, 128), (200, 220, 240))
    tasks = [
        TaskRequest(
            image=image_a,
            kind="ground",
            text="the red circle",
            config=PruningConfig(method="nuwa", budget=0.25),
        ),
        TaskRequest(
            image=image_b,
            kind="answer",
            text="What color?",
            config=PruningConfig(method="none"),
            max_new_tokens=3,
        ),
    ]
    results, timings = runner.run(tasks)
    assert [r.image_size for r in results] == [(160, 96), (96, 128)]
    assert results[0].report.method == "nuwa" and results[0].report.average < results[0].report.original
    assert results[1].report.stage2 == results[1].report.original
    assert 1 <= results[1].completion_tokens <= 3
    assert results[0].model_input_size == runner.frame_for((160, 96)).input_size
    assert runner.estimate_visual_tokens((160, 96)) == results[0].report.original
    assert timings.vision > 0 and timings.prefill > 0 and timings.total >= timings.prefill
    alone, _ = runner.run(tasks[:1])
    assert alone[0].raw_output == results[0].raw_output


def test_box_mapping_to_original_pixels(runner):
    size = (200, 100)
    if runner.adapter.family == "llava":
        # padded to a 200x200 square, the image sits at y in [50, 150)
        assert _to_original(runner, (0.1, 0.25, 0.5, 0.75), size) == pytest.approx((20, 0, 100, 100))
        assert _to_original(runner, (0.0, 0.5, 1.0, 0.6), size) == pytest.approx((0, 50, 200, 70))
    else:
        assert _to_original(runner, (0.1, 0.25, 0.5, 0.75), size) == pytest.approx((20, 25, 100, 75))


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_dir(tmp_path / "nope")


def test_extreme_aspect_ratio_is_bounded_before_padding(runner):
    """A 20000 x 2 image must not become a 20000 x 20000 canvas; boxes still map to original pixels."""
    image = Image.new("RGB", (20000, 2), (230, 230, 230))
    if runner.adapter.family == "qwen2_5_vl":
        with pytest.raises(ValueError, match="aspect ratio"):  # Qwen's own processor refuses > 200:1
            runner.adapter.prepare([image], ["What color?"])
        return
    batch = runner.adapter.prepare([image], ["What color?"])
    assert batch.image_sizes == [(20000, 2)]
    assert runner.frame_for((20000, 2)) == batch.frames[0]
    if runner.adapter.family == "llava":
        assert _to_original(runner, (0.0, 0.0, 1.0, 1.0), (20000, 2)) == pytest.approx((0, 0, 20000, 2))
        assert _to_original(runner, (0.25, 0.0, 0.5, 1.0), (20000, 2)) == pytest.approx((5000, 0, 10000, 2))

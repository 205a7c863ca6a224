"""A LLaVA-1.5 directory laid out like an older llava-hf conversion: `preprocessor_config.json` for the image
processor and a `processor_config.json` without `num_additional_image_tokens`.

The stock processor then expands `<image>` to one placeholder too few (CLIP's CLS token is not counted) and the
worker failed its warm-up forever with "sample 0: 63 image placeholders but 64 visual tokens" (575 / 576 at 336
px). The adapter derives the count from the model, so the directory serves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from models.budget import PruningConfig
from models.llava import LlavaAdapter, align_processor_with_model, vision_additional_tokens
from models.loading import load_runner
from models.tasks import TaskRequest
from tests.models.tiny import tiny_llava

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def old_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llava-old")
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    saved = json.loads((directory / "processor_config.json").read_text())
    image_processor = saved.pop("image_processor")
    (directory / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    saved.pop("num_additional_image_tokens")
    (directory / "processor_config.json").write_text(json.dumps(saved, indent=2))
    return directory


def test_the_stock_processor_alone_miscounts_the_placeholders(old_llava_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(old_llava_dir)
    assert processor.num_additional_image_tokens == 0  # the precondition of the bug
    ids = processor(images=[Image.new("RGB", (112, 112))], text=["<image> hi"], return_tensors="pt")[
        "input_ids"
    ]
    assert int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 63


def test_an_old_conversion_serves_with_the_count_derived_from_the_model(old_llava_dir: Path) -> None:
    runner = load_runner(old_llava_dir, device="cpu")
    assert runner.adapter.processor.num_additional_image_tokens == 1
    task = TaskRequest(
        image=Image.new("RGB", (160, 96), (230, 230, 230)),
        kind="ground",
        text="the red circle",
        config=PruningConfig(method="nuwa", budget=0.25),
    )
    results, _ = runner.run([task])
    assert results[0].report.original == 64
    assert results[0].report.stage1 < 64


def test_alignment_reads_the_tower_and_reports_what_it_changed() -> None:
    model, processor = tiny_llava(seed=0)
    assert vision_additional_tokens(model) == 1  # CLIP: num_positions = patches + CLS
    processor.num_additional_image_tokens = 0
    processor.patch_size = None
    changed = align_processor_with_model(model, processor)
    assert changed == {"num_additional_image_tokens": (0, 1), "patch_size": (None, 14)}
    assert align_processor_with_model(model, processor) == {}  # already right: nothing to change
    adapter = LlavaAdapter(model, processor)
    batch = adapter.prepare([Image.new("RGB", (112, 112))], ["What color?"])
    placeholders = int((batch.inputs["input_ids"] == adapter.image_token_id).sum())
    assert placeholders == adapter.estimate_visual_tokens((112, 112)) == 64

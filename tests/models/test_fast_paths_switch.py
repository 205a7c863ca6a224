"""`fast_paths=False` (`NUWA_FAST_PATHS=false`) runs the stock transformers code everywhere, with the same answers.

The shortcuts are each tested bit-exact elsewhere (`test_clip_pixels.py`, `test_probes.py`, `test_fast_decode.py`);
this checks that the switch really turns every one of them off (no lookup-table pixels, the whole CLIP tower,
no fast decode step, the Llama weights left unfused) and that both settings answer the same.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from models.budget import PruningConfig
from models.builtin import BUILTIN_MODEL_DIR
from models.loading import load_runner
from models.tasks import TaskRequest

torch.set_num_threads(1)


def _tasks() -> list[TaskRequest]:
    from bench.payloads import scene_png

    tasks = []
    for seed, config in ((41, PruningConfig(method="none")), (42, PruningConfig(method="nuwa", budget=0.25))):
        data, phrase, _ = scene_png(seed)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        tasks.append(TaskRequest(image=image, kind="ground", text=phrase, config=config, max_new_tokens=8))
    return tasks


@pytest.fixture(scope="module")
def runners():
    return load_runner(BUILTIN_MODEL_DIR, "cpu"), load_runner(BUILTIN_MODEL_DIR, "cpu", fast_paths=False)


def test_the_switch_turns_every_shortcut_off(runners) -> None:
    fast, stock = runners
    assert fast.adapter.fast_decode_step is not None and fast.adapter.clip_pixels is not None
    assert stock.adapter.fast_decode_step is None and stock.adapter.clip_pixels is None
    attention = stock.adapter.decoder_layers[0].self_attn
    pointers = {
        p.weight.untyped_storage().data_ptr() for p in (attention.q_proj, attention.k_proj, attention.v_proj)
    }
    assert len(pointers) == 3  # unfused: three storages
    fused = fast.adapter.decoder_layers[0].self_attn
    assert (
        len({p.weight.untyped_storage().data_ptr() for p in (fused.q_proj, fused.k_proj, fused.v_proj)}) == 1
    )
    ran = []
    handles = [
        layer.register_forward_hook(lambda *_, i=i: ran.append(i))
        for i, layer in enumerate(stock.adapter.vision_layers)
    ]
    try:
        stock.run([_tasks()[0]])  # unpruned: the fast path would stop before the last CLIP layer
    finally:
        for handle in handles:
            handle.remove()
    assert ran == list(range(len(stock.adapter.vision_layers)))


def test_both_settings_give_the_same_answers(runners) -> None:
    fast, stock = runners
    ours, _ = fast.run(_tasks())
    reference, _ = stock.run(_tasks())
    assert [r.raw_output for r in ours] == [r.raw_output for r in reference]
    assert [r.boxes for r in ours] == [r.boxes for r in reference]
    assert [r.report.kept for r in ours] == [r.report.kept for r in reference]
    assert all(
        r.boxes for r in ours
    )  # the trained model found something: the comparison is not empty vs empty

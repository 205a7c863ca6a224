"""The prefill's last layer runs o_proj and the MLP on the last positions only (`models.last_position`).

Each case runs the same prefill twice, hooks armed and the whole layer, and compares the logits and every layer's
KV cache: unpruned, stage-2 drops (Nüwa, FastV: the last layer sees a re-padded, shorter sequence), stage 1 only,
mixed methods in one padded batch, and batch sizes below and above the probe's row count.

Where this CPU's BLAS passed the start-up probe the comparison is `torch.equal` (what the service relies on). Where
it refused every row count (an AVX-512 / AMX Xeon does, for the built-in model's 1024-wide MLP), the service runs
the whole layer; the tests then attach the hooks anyway with `PROBE_MAX_ROWS` rows, so the narrowing and widening
are still checked: KV caches equal, logits to float32 tolerance with the same argmax.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import DynamicCache

from models import last_position
from models.budget import PruningConfig
from models.builtin import BUILTIN_MODEL_DIR
from models.last_position import LastPositionRows
from models.llava import LlavaAdapter
from models.loading import load_runner
from models.qwen2_5_vl import Qwen2_5_VLAdapter
from models.qwen3_vl import Qwen3VLAdapter
from tests.models.tiny import tiny_llava, tiny_qwen, tiny_qwen3_vl

torch.set_num_threads(1)

PROMPTS = [
    "What color is the circle?",
    "Locate the red square in the image please",
    "How many?",
    "Where?",
] * 4

NONE = PruningConfig(method="none")
NUWA_25 = PruningConfig(method="nuwa", budget=0.25)
NUWA_50 = PruningConfig(method="nuwa", budget=0.5)
FASTV_50 = PruningConfig(method="fastv", budget=0.5)
STAGE1_ONLY = PruningConfig(method="nuwa", budget=0.25, stage1_fraction=1.0)


def _images(count: int, side: int) -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def _prefill(adapter, llm, armed: bool) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    saved = adapter.last_rows
    if not armed:
        adapter.last_rows = None
    cache = DynamicCache(config=adapter.model.config.text_config)
    try:
        logits = adapter.run_llm(llm, cache=cache, logits_to_keep=1).logits
    finally:
        adapter.controller.finish()
        adapter.last_rows = saved
    return logits, [(layer.keys, layer.values) for layer in cache.layers]


def _with_hooks(adapter) -> tuple[object, bool]:
    """The adapter, and whether its hooks are the probe's (bit-exact here) rather than attached by the test.

    Where the probe refused, `last_rows` is None (the service's behaviour, checked below); the hooks are attached
    with `PROBE_MAX_ROWS` rows so that every case still runs the narrowed layer.
    """
    if adapter.last_rows is not None:
        return adapter, True
    layer = adapter.decoder_layers[-1]
    assert LastPositionRows.for_layer(layer) is None  # the service really runs the whole layer here
    adapter.last_rows = LastPositionRows(layer.self_attn.o_proj, layer.mlp, last_position.PROBE_MAX_ROWS)
    return adapter, False


def _assert_same_prefill(fixture: tuple[object, bool], images, configs) -> None:
    adapter, exact = fixture
    batch = adapter.prepare(images, PROMPTS[: len(images)])
    with torch.inference_mode():
        llm = adapter.prune(batch, configs)
        before = adapter.last_rows.armed_runs
        fast_logits, fast_cache = _prefill(adapter, llm, armed=True)
        assert adapter.last_rows.armed_runs == before + 1
        stock_logits, stock_cache = _prefill(adapter, llm, armed=False)
    if exact:
        assert torch.equal(fast_logits, stock_logits), float((fast_logits - stock_logits).abs().max())
    else:
        torch.testing.assert_close(fast_logits, stock_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(fast_logits.argmax(-1), stock_logits.argmax(-1))
    assert len(fast_cache) == len(stock_cache)
    for (fast_keys, fast_values), (keys, values) in zip(fast_cache, stock_cache, strict=True):
        assert torch.equal(fast_keys, keys) and torch.equal(fast_values, values)


@pytest.fixture(scope="module")
def tiny_adapter() -> tuple[LlavaAdapter, bool]:
    model, processor = tiny_llava(seed=0)
    return _with_hooks(LlavaAdapter(model, processor))


@pytest.fixture(scope="module")
def builtin_adapter():
    return _with_hooks(load_runner(BUILTIN_MODEL_DIR, device="cpu").adapter)


@pytest.mark.parametrize(
    "configs",
    [
        [NONE],
        [NUWA_25],
        [NONE, NONE],
        [NONE, NUWA_25, FASTV_50],
        [NUWA_50, STAGE1_ONLY, NONE, FASTV_50],
        [NONE] * 8,
        [NUWA_25, FASTV_50] * 4,
    ],
    ids=["1-none", "1-nuwa", "2-none", "3-mixed", "4-mixed", "8-none", "8-drops"],
)
def test_tiny_llava_prefill_matches_the_whole_layer(tiny_adapter, configs) -> None:
    _assert_same_prefill(tiny_adapter, _images(len(configs), 64), configs)


@pytest.mark.parametrize("scoring", ["last_token_mean", "text_cosine"])
def test_a_drop_right_before_the_last_layer_matches_the_whole_layer(tiny_adapter, scoring) -> None:
    """The last layer then sees the controller's re-padded, shorter sequence."""
    last = len(tiny_adapter[0].decoder_layers) - 1
    drop = PruningConfig(method="nuwa", budget=0.25, stage2_layer=last, stage2_scoring=scoring)
    _assert_same_prefill(tiny_adapter, _images(3, 64), [drop, NONE, drop])


@pytest.mark.parametrize(
    "configs",
    [[NONE], [NUWA_50], [NONE, NUWA_25, FASTV_50], [NONE] * 8, [NUWA_50] * 8],
    ids=["1-none", "1-nuwa50", "3-mixed", "8-none", "8-nuwa50"],
)
def test_builtin_prefill_matches_the_whole_layer(builtin_adapter, configs) -> None:
    _assert_same_prefill(builtin_adapter, _images(len(configs), 336), configs)


def test_only_the_last_positions_run_through_the_mlp(builtin_adapter) -> None:
    builtin_adapter, _ = builtin_adapter
    rows = builtin_adapter.last_rows
    assert rows is not None and rows.min_rows >= 1
    seen: list[tuple[int, ...]] = []
    layer = builtin_adapter.decoder_layers[-1]
    handle = layer.mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        for count in (1, 3, 8):
            seen.clear()
            batch = builtin_adapter.prepare(_images(count, 336), PROMPTS[:count])
            with torch.inference_mode():
                llm = builtin_adapter.prune(batch, [NONE] * count)
                _prefill(builtin_adapter, llm, armed=True)
            keep = rows.rows_per_sample(count)
            assert seen == [(count, keep, layer.mlp.down_proj.in_features)]
            assert count * keep >= rows.min_rows
            assert keep < llm.input_ids.shape[1]
    finally:
        handle.remove()


def test_hooks_are_inert_outside_a_prefill(builtin_adapter) -> None:
    """Decode steps call the hooked o_proj: there it runs on every row it is given, untouched."""
    builtin_adapter, _ = builtin_adapter
    layer = builtin_adapter.decoder_layers[-1]
    states = torch.randn(2, 7, layer.self_attn.o_proj.in_features)
    with torch.inference_mode():
        assert torch.equal(
            layer.self_attn.o_proj(states), nn.functional.linear(states, layer.self_attn.o_proj.weight)
        )
        assert layer.mlp(states[..., : layer.mlp.gate_proj.in_features]).shape[:2] == (2, 7)


def test_probe_finds_the_smallest_exact_row_count(monkeypatch) -> None:
    linear = nn.Linear(32, 48, bias=False)
    exact = last_position.F.linear

    def small_rows_differ(states, weight, bias=None, threshold=6):
        out = exact(states, weight, bias)
        return out + 1e-6 if states.numel() // states.shape[-1] < threshold else out

    monkeypatch.setattr(last_position.F, "linear", small_rows_differ)
    assert LastPositionRows.probe_min_rows([linear]) == 6

    def every_row_count_differs(states, weight, bias=None):
        return exact(states, weight, bias) + 1e-3 * (states.numel() // states.shape[-1])

    monkeypatch.setattr(last_position.F, "linear", every_row_count_differs)
    assert LastPositionRows.probe_min_rows([linear]) is None


def test_rows_per_sample_covers_the_minimum() -> None:
    rows = LastPositionRows.__new__(LastPositionRows)
    rows.min_rows = 4
    assert [rows.rows_per_sample(b) for b in (1, 2, 3, 4, 5, 16)] == [4, 2, 2, 1, 1, 1]


def test_a_batch_beyond_the_probed_rows_runs_the_whole_layer() -> None:
    """`NUWA_MAX_BATCH_SIZE` has no upper bound; exactness was measured up to `PROBE_ROWS` rows only."""
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
    rows = LastPositionRows(nn.Linear(8, 8), mlp, min_rows=4)
    limit = last_position.PROBE_ROWS
    assert rows.covers(limit) and not rows.covers(limit + 1)
    with rows.only_last(limit):
        assert rows._keep == 1
    with rows.only_last(limit + 1):
        assert rows._keep is None  # not armed: the hooks pass every row through
    assert rows.armed_runs == 1


@pytest.fixture(scope="module", params=["qwen2.5-vl", "qwen3-vl"])
def qwen_adapter(request):
    if request.param == "qwen2.5-vl":
        return _with_hooks(Qwen2_5_VLAdapter(*tiny_qwen(seed=0)))
    return _with_hooks(Qwen3VLAdapter(*tiny_qwen3_vl(seed=0)))  # its deepstack runs in the same prefill


@pytest.mark.parametrize(
    "configs",
    [[NONE], [NONE, NUWA_25, FASTV_50], [NUWA_50, STAGE1_ONLY, NONE, FASTV_50]],
    ids=["1-none", "3-mixed", "4-mixed"],
)
def test_qwen_prefill_matches_the_whole_layer(qwen_adapter, configs) -> None:
    """M-RoPE positions and the families' own layers: the same hooks on the last layer's o_proj and MLP."""
    _assert_same_prefill(qwen_adapter, _images(len(configs), 112), configs)


def test_other_families_and_fast_paths_off_run_the_whole_layer() -> None:
    model, processor = tiny_llava(seed=0)
    assert LlavaAdapter(model, processor, fast_paths=False).last_rows is None
    qwen_model, qwen_processor = tiny_qwen(seed=0)
    assert Qwen2_5_VLAdapter(qwen_model, qwen_processor, fast_paths=False).last_rows is None
    moe_model, moe_processor = tiny_qwen3_vl(seed=0, moe=True)  # no fast decode step, no shortcut either
    assert Qwen3VLAdapter(moe_model, moe_processor).last_rows is None


def test_the_probe_layouts_try_every_row_count_up_to_its_bound() -> None:
    tried = {
        batch * keep
        for batch, positions in last_position.PROBE_BATCHES
        for keep in range(1, min(positions, last_position.PROBE_ROWS // batch) + 1)
    }
    assert set(range(1, last_position.PROBE_ROWS + 1)) <= tried

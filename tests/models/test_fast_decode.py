"""The fast Llama decode step gives the stock forward's logits bit for bit (`models.fast_decode`).

Both paths decode the same prefill side by side, step by step (the stock step on a copy of the KV cache), for a
padded batch whose samples kept different numbers of tokens: unpruned, a stage-2 drop (Nüwa, FastV: layers after
the drop hold a shorter cache with their own padding), and stage 1 only; the in-place KV buffers hold what the
stock cache holds after every step, growing past their room. The built-in checkpoint is checked too.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DynamicCache

from models.budget import PruningConfig
from models.builtin import BUILTIN_MODEL_DIR
from models.clocks import StageClock
from models.decoding import decode_step, greedy_decode
from models.fast_decode import FusedProjections, KVBuffers, LlamaDecodeStep
from models.llava import LlavaAdapter
from models.loading import load_runner
from models.qwen2_5_vl import Qwen2_5_VLAdapter
from models.qwen3_vl import Qwen3VLAdapter
from tests.models.tiny import tiny_llava, tiny_qwen, tiny_qwen3_vl

torch.set_num_threads(1)

PROMPTS = ["What color is the circle?", "Locate the red square in the image please", "How many?"]
UNPRUNED = [PruningConfig(method="none")] * 3
MIXED_DROPS = [  # a padded batch whose samples keep different numbers of tokens, two with an LLM-side drop
    PruningConfig(method="nuwa", budget=0.25),
    PruningConfig(method="none"),
    PruningConfig(method="fastv", budget=0.5),
]


def _images(count: int, side: int) -> list[Image.Image]:
    rng = np.random.default_rng(11)
    return [
        Image.fromarray(rng.integers(0, 256, (side, side + 8 * i, 3), dtype=np.uint8)) for i in range(count)
    ]


def _side_by_side(adapter, images, configs, steps: int = 5) -> list[float]:
    """Largest |fast - stock| logit difference per step, decoding the fast path's own greedy tokens."""
    fast = adapter.fast_decode_step
    assert fast is not None
    batch = adapter.prepare(images, PROMPTS[: len(images)])
    differences = []
    with torch.inference_mode():
        llm = adapter.prune(batch, configs)
        stock_cache = DynamicCache(config=adapter.model.config.text_config)
        try:
            outputs = adapter.run_llm(llm, cache=stock_cache, logits_to_keep=1)
            adapter.controller.end_prefill()
            buffers = KVBuffers(copy.deepcopy(stock_cache), extra=steps)
            generated = outputs.logits[:, -1].argmax(dim=-1)[:, None]
            for _ in range(steps):
                stock = decode_step(adapter.model, llm, generated, stock_cache).logits[:, -1]
                ours = fast(llm, generated, buffers, adapter.controller.decode_key_valid)
                differences.append(float((ours - stock).abs().max()))
                for index, layer in enumerate(stock_cache.layers):  # same cache contents, layer by layer
                    length = buffers.get_seq_length(index)
                    assert torch.equal(buffers.keys[index][:, :, :length], layer.keys)
                    assert torch.equal(buffers.values[index][:, :, :length], layer.values)
                generated = torch.cat([generated, ours.argmax(dim=-1)[:, None]], dim=1)
        finally:
            adapter.controller.finish()
    return differences


@pytest.fixture(scope="module")
def tiny_adapter() -> LlavaAdapter:
    model, processor = tiny_llava(seed=0)
    return LlavaAdapter(model, processor)


@pytest.mark.parametrize(
    "configs",
    [
        UNPRUNED,
        MIXED_DROPS,
        [PruningConfig(method="nuwa_stage1", budget=0.5)] * 3,
    ],
    ids=["unpruned", "mixed-drops", "stage1-only"],
)
def test_fast_step_equals_the_stock_forward_exactly(tiny_adapter, configs, monkeypatch) -> None:
    monkeypatch.setattr(KVBuffers, "chunk", 2)  # the buffers grow twice in 5 steps
    differences = _side_by_side(tiny_adapter, _images(3, 112), configs)
    assert differences == [0.0] * 5


def test_builtin_checkpoint_fast_step_is_exact_and_used_by_generation() -> None:
    runner = load_runner(BUILTIN_MODEL_DIR, "cpu")
    adapter = runner.adapter
    configs = [PruningConfig(method="none"), PruningConfig(method="nuwa", budget=0.25)]
    assert _side_by_side(adapter, _images(2, 336), configs, steps=4) == [0.0] * 4
    calls = []
    fast = adapter.fast_decode_step

    class Counting:
        def __call__(self, *args):
            calls.append(type(args[2]).__name__)
            return fast(*args)

    adapter.fast_decode_step = Counting()
    try:
        batch = adapter.prepare(_images(2, 336), PROMPTS[:2])
        with torch.inference_mode():
            llm = adapter.prune(batch, configs)
            sequences, _, _ = greedy_decode(
                adapter, llm, [6, 6], StageClock(torch.device("cpu")), stop_at_eos=False
            )
    finally:
        adapter.fast_decode_step = fast
    assert calls == ["KVBuffers"] * 5  # every cached step after the prefill, on the in-place buffers
    assert [len(s) for s in sequences] == [6, 6]


def _with_random_biases_and_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Random q/k/v biases and norm weights: initialised, they are 0 and 1, which would hide a bias or norm left out."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.model.language_model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.copy_(parameter + 0.5 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module", params=["qwen2.5-vl", "qwen3-vl"])
def qwen_adapter(request) -> Qwen2_5_VLAdapter:
    if request.param == "qwen2.5-vl":
        model, processor = tiny_qwen(seed=0)
        return Qwen2_5_VLAdapter(_with_random_biases_and_norms(model), processor)
    model, processor = tiny_qwen3_vl(seed=0)
    return Qwen3VLAdapter(_with_random_biases_and_norms(model), processor)


@pytest.mark.parametrize(
    "configs",
    [
        UNPRUNED,
        MIXED_DROPS,
    ],
    ids=["unpruned", "mixed-drops"],
)
def test_qwen_fast_step_equals_the_stock_forward_exactly(qwen_adapter, configs, monkeypatch) -> None:
    """Qwen2.5-VL (q/k/v biases) and Qwen3-VL (per-head q/k norms): M-RoPE positions of a padded, pruned batch."""
    monkeypatch.setattr(KVBuffers, "chunk", 2)
    step = qwen_adapter.fast_decode_step
    assert step is not None and step.fused is not None and step.fusion_is_exact(3)
    if isinstance(qwen_adapter, Qwen3VLAdapter):
        assert hasattr(step.layers[0].self_attn, "q_norm")
    else:
        assert step.fused[0].qkv_bias is not None
    differences = _side_by_side(qwen_adapter, _images(3, 112), configs)
    assert differences == [0.0] * 5


def test_qwen_separate_products_equal_the_stock_forward_exactly(qwen_adapter, monkeypatch) -> None:
    """The path a batch size takes when its fused products were not exact (biases and q/k norms unfused)."""
    monkeypatch.setattr(LlamaDecodeStep, "fusion_is_exact", lambda self, batch: False)
    configs = [PruningConfig(method="nuwa", budget=0.25), PruningConfig(method="none")]
    assert _side_by_side(qwen_adapter, _images(2, 112), configs, steps=3) == [0.0] * 3


def test_other_language_models_keep_the_stock_forward() -> None:
    model, processor = tiny_qwen3_vl(seed=0, moe=True)
    assert Qwen3VLAdapter(model, processor).fast_decode_step is None  # the MoE text model
    model, processor = tiny_qwen(seed=0)
    assert Qwen2_5_VLAdapter(model, processor, fast_paths=False).fast_decode_step is None
    model, processor = tiny_llava(seed=0)
    model.config.text_config._attn_implementation = "eager"
    assert LlamaDecodeStep.for_model(model) is None


def test_fused_weights_are_the_modules_storage_and_leave_the_stock_forward_unchanged() -> None:
    model, processor = tiny_llava(seed=3)
    adapter = LlavaAdapter(model, processor)  # fuses on construction
    fused = adapter.fast_decode_step.fused
    assert fused is not None and len(fused) == len(adapter.fast_decode_step.layers)
    twin, _ = tiny_llava(seed=3)  # the same weights, never fused
    for layer, twin_layer, projections in zip(
        adapter.fast_decode_step.layers, twin.model.language_model.layers, fused, strict=True
    ):
        attention, mlp = layer.self_attn, layer.mlp
        parts = [attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj]
        storages = {part.weight.untyped_storage().data_ptr() for part in parts[:3]}
        assert storages == {projections.qkv.untyped_storage().data_ptr()}  # views, no second copy
        assert {part.weight.untyped_storage().data_ptr() for part in parts[3:]} == {
            projections.gate_up.untyped_storage().data_ptr()
        }
        twin_parts = [twin_layer.self_attn.q_proj, twin_layer.self_attn.k_proj, twin_layer.self_attn.v_proj]
        twin_parts += [twin_layer.mlp.gate_proj, twin_layer.mlp.up_proj]
        assert all(torch.equal(a.weight, b.weight) for a, b in zip(parts, twin_parts, strict=True))
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model.model.language_model(input_ids=ids).last_hidden_state
        stock = twin.model.language_model(input_ids=ids).last_hidden_state
    assert torch.equal(ours, stock)


def test_fusion_check_can_refuse_and_the_separate_products_stay_exact(tiny_adapter, monkeypatch) -> None:
    fast = tiny_adapter.fast_decode_step
    assert fast.fused is not None
    assert fast.fusion_is_exact(3)  # on this CPU the fused products are exact
    monkeypatch.setattr(fast, "_exact_at", {3: False})  # a BLAS that orders the fused reduction differently
    calls = []
    monkeypatch.setattr(fast, "_fused_qkv", lambda *args: calls.append(args))
    configs = [PruningConfig(method="none"), PruningConfig(method="nuwa", budget=0.25)]
    configs.append(PruningConfig(method="fastv", budget=0.5))
    assert _side_by_side(tiny_adapter, _images(3, 112), configs) == [0.0] * 5
    assert calls == []  # the separate-products layer ran every step


def test_fusion_check_sees_a_different_reduction(tiny_adapter, monkeypatch) -> None:
    fast = tiny_adapter.fast_decode_step
    monkeypatch.setattr(fast, "_exact_at", {})
    real_linear = torch.nn.functional.linear

    def reordered(x, weight, bias=None):  # the fused product summed in another order: last bits differ
        if weight is fast.fused[-1].gate_up:
            return (real_linear(x.flip(-1), weight.flip(-1)) * 3.0) / 3.0
        return real_linear(x, weight, bias)

    monkeypatch.setattr("models.fast_decode.F.linear", reordered)
    assert not fast.fusion_is_exact(2)


def test_projections_with_a_bias_are_not_fused() -> None:
    model, _ = tiny_llava(seed=0)
    layer = model.model.language_model.layers[0]
    layer.self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(layer.self_attn.q_proj.out_features))
    before = layer.self_attn.q_proj.weight
    assert FusedProjections.fuse(layer) is None
    assert layer.self_attn.q_proj.weight is before
    step = LlamaDecodeStep.for_model(model)
    assert step is not None and step.fused is None  # the step still runs, on the separate modules


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_qwen_generation_is_the_same_with_fast_paths_on_and_off(family) -> None:
    """The whole greedy loop (prefill with the last-layer shortcut, then the fast steps on `KVBuffers`) against the
    stock code of a twin model with the same weights, on a padded batch with a stage-2 drop. Tokens only: the
    logits are compared bit for bit by the tests above."""
    build, adapter_type = (
        (tiny_qwen, Qwen2_5_VLAdapter) if family == "qwen2.5-vl" else (tiny_qwen3_vl, Qwen3VLAdapter)
    )
    fast = adapter_type(_with_random_biases_and_norms(build(seed=4)[0]), build(seed=4)[1])
    stock = adapter_type(_with_random_biases_and_norms(build(seed=4)[0]), build(seed=4)[1], fast_paths=False)
    assert fast.fast_decode_step is not None and stock.fast_decode_step is None and stock.last_rows is None
    configs = [
        PruningConfig(method="nuwa", budget=0.25),
        PruningConfig(method="none"),
        PruningConfig(method="none"),
    ]
    calls = []
    step = fast.fast_decode_step
    fast.fast_decode_step = lambda *args: calls.append(type(args[2]).__name__) or step(*args)
    sequences = []
    for adapter in (fast, stock):
        batch = adapter.prepare(_images(3, 112), PROMPTS)
        with torch.inference_mode():
            llm = adapter.prune(batch, configs)
            tokens, _, _ = greedy_decode(
                adapter, llm, [7, 7, 7], StageClock(torch.device("cpu")), stop_at_eos=False
            )
        sequences.append(tokens)
    assert calls == ["KVBuffers"] * 6  # every step after the prefill went through the fast step
    assert sequences[0] == sequences[1]
    assert len({tuple(s) for s in sequences[0]}) > 1  # the samples differ: not trivially equal

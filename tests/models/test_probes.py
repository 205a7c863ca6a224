"""Attention probes inside real transformers models: only the probed module is rerouted, every other module keeps
the configured implementation (including a packed-varlen "flash" one on Qwen's vision tower), the similarity
accumulated by hooks equals the mean of the hidden states it replaced, and Qwen's salience block is the last
FULL-attention block whatever follows it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from models.attention import PROBE_PREFIX, ColumnSumProbe, attach_probe
from models.budget import PruningConfig
from models.llava import LlavaAdapter
from models.qwen2_5_vl import Qwen2_5_VLAdapter, last_full_attention_block
from tests.models.tiny import tiny_llava, tiny_qwen

torch.set_num_threads(1)

COUNTING = "test_counting_sdpa"
VARLEN = "test_flash_varlen"  # contains "flash": Qwen's vision attention takes its packed (cu_seqlens) path
CALLS: list[
    tuple[torch.nn.Module, str, tuple[int, ...]]
] = []  # (module, implementation it ran under, q shape)


def _counting_sdpa(module, query, key, value, attention_mask, **kwargs):
    CALLS.append((module, module.config._attn_implementation, tuple(query.shape)))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _varlen(module, query, key, value, attention_mask, **kwargs):
    """A CPU stand-in for varlen flash attention: ONE call for all packed sequences, split by cu_seq_lens."""
    CALLS.append((module, module.config._attn_implementation, tuple(query.shape)))
    bounds = kwargs.pop("cu_seq_lens_q").tolist()
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(COUNTING, _counting_sdpa)
AttentionInterface.register(VARLEN, _varlen)


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGES = [_image(0, (112, 112)), _image(1, (168, 112))]
PROMPTS = ["What color is the circle?", "Locate the red square in the image please"]


def _configure(model: torch.nn.Module, vision: str, text: str) -> None:
    """Set the implementation the way transformers stores it: on the shared sub-configs."""
    model.config.vision_config._attn_implementation_internal = vision
    model.config.text_config._attn_implementation_internal = text


def _attention_modules(adapter) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    if adapter.family == "llava":
        vision = [layer.self_attn for layer in adapter.vision_layers]
    else:
        vision = [block.attn for block in adapter.model.model.visual.blocks]
    return vision, [layer.self_attn for layer in adapter.decoder_layers]


def _probed_vision(adapter) -> torch.nn.Module:
    if adapter.family == "llava":
        return adapter.vision_layers[len(adapter.vision_layers) - 2].self_attn
    return adapter.model.model.visual.blocks[adapter.salience_block].attn


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_only_the_probed_modules_leave_the_configured_implementation(family):
    model, processor = tiny_llava(seed=0) if family == "llava" else tiny_qwen(seed=0)
    _configure(model, COUNTING, COUNTING)
    adapter = LlavaAdapter(model, processor) if family == "llava" else Qwen2_5_VLAdapter(model, processor)
    vision, text = _attention_modules(adapter)
    batch = adapter.prepare(IMAGES, PROMPTS)
    CALLS.clear()
    output = adapter.forward(batch, [PruningConfig(method="nuwa", budget=0.25)] * 2)
    per_layer = output.reports[0].per_layer
    drop_layer = next(i for i in range(1, len(per_layer)) if per_layer[i] != per_layer[i - 1])
    expected_probed = {id(_probed_vision(adapter)), id(text[drop_layer - 1])}
    probed = {id(module) for module, name, _ in CALLS if name.startswith(PROBE_PREFIX)}
    assert probed == expected_probed
    assert {name for _, name, _ in CALLS} == {COUNTING, PROBE_PREFIX + COUNTING}
    # Every attention module, the probed ones included, ran the configured function (the probe calls it).
    assert {id(module) for module, _, _ in CALLS} == {id(m) for m in vision + text}
    # Detached afterwards: every module shares its tower's config object again.
    assert all(module.config is model.config.vision_config for module in vision)
    assert all(module.config is model.config.text_config for module in text)
    assert not any(hasattr(module, "_nuwa_probe") for module in vision + text)


def test_qwen_windowed_blocks_keep_one_varlen_call_and_salience_is_unchanged():
    reference_model, processor = tiny_qwen(seed=0)
    reference = Qwen2_5_VLAdapter(reference_model, processor)
    model, processor = tiny_qwen(seed=0)
    _configure(model, VARLEN, "sdpa")
    adapter = Qwen2_5_VLAdapter(model, processor)
    batch = adapter.prepare(IMAGES, PROMPTS)
    configs = [PruningConfig(method="nuwa", budget=0.25)] * 2
    CALLS.clear()
    with torch.inference_mode():
        encoded = adapter.encode_images(batch, configs)
        expected = reference.encode_images(batch, configs)
    blocks = [block.attn for block in model.model.visual.blocks]
    # One packed call per block per forward (2 images, windows inside): windowed and probed block alike.
    assert [sum(module is attn for module, _, _ in CALLS) for attn in blocks] == [1, 1]
    probed_calls = [name for module, name, _ in CALLS if module is blocks[adapter.salience_block]]
    assert probed_calls == [PROBE_PREFIX + VARLEN]
    for got, want in zip(encoded, expected, strict=True):
        torch.testing.assert_close(got.features, want.features, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.salience, want.salience, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.similarity, want.similarity, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.key_norm, want.key_norm, atol=1e-5, rtol=0)
    assert [e.num_tokens for e in encoded] == [16, 24]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_hooked_similarity_equals_the_mean_of_output_hidden_states(family):
    """What `output_hidden_states=True` + stacking used to compute, for two similarity ranges in one batch."""
    model, processor = tiny_llava(seed=0) if family == "llava" else tiny_qwen(seed=0, vision_depth=4)
    adapter = LlavaAdapter(model, processor) if family == "llava" else Qwen2_5_VLAdapter(model, processor)
    batch = adapter.prepare(IMAGES, PROMPTS)
    ranges = [(0.5, 1.0), (0.2, 0.6)]
    configs = [PruningConfig(method="nuwa", budget=0.25, similarity_layers=r) for r in ranges]
    with torch.inference_mode():
        encoded = adapter.encode_images(batch, configs)
        if family == "llava":
            states = model.model.vision_tower(
                batch.inputs["pixel_values"], output_hidden_states=True
            ).hidden_states
            depth = len(adapter.vision_layers)
            for b, (start, end) in enumerate(ranges):
                first = max(1, round(start * depth))
                last = max(first, round(end * depth))
                mean = torch.stack([states[i][b, 1:] for i in range(first, last + 1)]).mean(0)
                want = torch.nn.functional.normalize(mean, dim=-1)
                torch.testing.assert_close(encoded[b].similarity, want, atol=1e-5, rtol=0)
                torch.testing.assert_close(encoded[b].features, states[-2][b, 1:], atol=0, rtol=0)
        else:
            visual = model.model.visual
            grid_thw = batch.inputs["image_grid_thw"]
            outputs = visual(batch.inputs["pixel_values"], grid_thw=grid_thw, output_hidden_states=True)
            blocks = outputs.hidden_states[-len(visual.blocks) :]
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                grid_thw, spatial_merge_size=2, window_size=visual.window_size, patch_size=14
            )
            reverse = torch.argsort(window_index)
            counts = (grid_thw.prod(-1) // 4).tolist()
            depth = len(visual.blocks)
            for b, (start, end) in enumerate(ranges):
                first = max(0, round(start * depth) - 1)
                last = max(first, round(end * depth) - 1)
                mean = torch.stack([blocks[i] for i in range(first, last + 1)]).mean(0)
                merged = mean.view(-1, 4, mean.shape[-1]).mean(1)[reverse]
                want = torch.nn.functional.normalize(merged, dim=-1).split(counts)[b]
                torch.testing.assert_close(encoded[b].similarity, want, atol=1e-5, rtol=0)
    assert not torch.allclose(encoded[0].similarity[:4], encoded[1].similarity[:4])  # the ranges differ


@pytest.mark.parametrize(
    ("depth", "full", "expected"), [(2, (1,), 1), (3, (1,), 1), (4, (0, 2), 2), (3, (0, 7), 0)]
)
def test_salience_block_is_the_last_full_attention_block(depth, full, expected):
    model, _ = tiny_qwen(seed=0, vision_depth=depth, fullatt_block_indexes=full)
    assert last_full_attention_block(model.config.vision_config) == expected


def test_no_full_attention_block_is_a_clear_error():
    model, processor = tiny_qwen(seed=0, vision_depth=2, fullatt_block_indexes=())
    with pytest.raises(ValueError, match="no full-attention block"):
        Qwen2_5_VLAdapter(model, processor)


def test_salience_with_a_windowed_last_block_is_received_attention_of_the_full_block():
    """Depth 3, full attention in block 1 only: block 2 is windowed, the probe must sit on block 1."""
    model, processor = tiny_qwen(seed=0, vision_depth=3, fullatt_block_indexes=(1,))
    adapter = Qwen2_5_VLAdapter(model, processor)
    assert adapter.salience_block == 1
    batch = adapter.prepare(IMAGES, PROMPTS)
    captured = {}
    attn = model.model.visual.blocks[1].attn

    def grab(module, args, kwargs):
        captured.update(hidden=args[0], cu=kwargs["cu_seqlens"], pe=kwargs["position_embeddings"])

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            encoded = adapter.encode_images(batch, [PruningConfig()] * 2)
    finally:
        handle.remove()
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    hidden = captured["hidden"]
    bounds = captured["cu"].tolist()
    assert bounds == [0, 64, 160]  # block 1 sees whole images (a windowed block would see 16-patch windows)
    with torch.inference_mode():
        qkv = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        q, k = apply_rotary_pos_emb_vision(qkv[0], qkv[1], *captured["pe"])
        columns = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            qi, ki = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1)
            probs = (qi @ ki.transpose(-1, -2) * attn.scaling).softmax(-1)  # (H, L, L)
            columns.append(probs.sum(dim=1).mean(dim=0))
    window_index, _ = get_vision_window_index(
        batch.inputs["image_grid_thw"],
        spatial_merge_size=2,
        window_size=model.model.visual.window_size,
        patch_size=14,
    )
    expected = torch.cat(columns).view(-1, 4).mean(1)[torch.argsort(window_index)]
    torch.testing.assert_close(torch.cat([e.salience for e in encoded]), expected, atol=1e-5, rtol=0)


def test_attach_and_detach_restore_the_shared_config():
    model, processor = tiny_llava(seed=0)
    attn = LlavaAdapter(model, processor).vision_layers[0].self_attn
    shared = attn.config
    attach_probe(attn, ColumnSumProbe())
    assert attn.config is not shared and attn.config._attn_implementation == PROBE_PREFIX + "sdpa"
    assert shared._attn_implementation == "sdpa"  # the tower's other layers are untouched
    attach_probe(attn, ColumnSumProbe())  # re-attaching keeps the one saved shared config
    attach_probe(attn, None)
    assert attn.config is shared
    attach_probe(attn, None)  # detaching twice is harmless
    assert attn.config is shared


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_probed_layer_outputs_exactly_what_the_configured_implementation_does(implementation):
    from models.attention import ClsRowProbe

    model, processor = tiny_llava(seed=0)
    _configure(model, implementation, implementation)
    adapter = LlavaAdapter(model, processor)
    pixel_values = adapter.prepare(IMAGES[:1], PROMPTS[:1]).inputs["pixel_values"]
    tower = model.model.vision_tower
    with torch.inference_mode():
        plain = tower(pixel_values).last_hidden_state
        probe = ClsRowProbe()
        attach_probe(adapter.vision_layers[1].self_attn, probe)
        try:
            probed = tower(pixel_values).last_hidden_state
        finally:
            attach_probe(adapter.vision_layers[1].self_attn, None)
    assert torch.equal(probed, plain)
    assert probe.salience is not None and probe.salience.shape == (1, 64)


@pytest.mark.parametrize(
    ("configs", "layers_run"),
    [
        (
            [PruningConfig(method="none"), PruningConfig(method="fastv", budget=0.5)],
            2,
        ),  # stop at the feature layer
        (
            [PruningConfig(), PruningConfig(method="nuwa", budget=0.25)],
            3,
        ),  # aggregation reads the last layer too
    ],
)
def test_llava_runs_the_layers_after_the_feature_layer_only_for_the_similarity(configs, layers_run):
    """The tiny tower has 3 layers and reads layer index 1 (`vision_feature_layer` -2): a batch that reads no
    similarity runs 2 of them, with the features the full tower gives, exactly."""
    model, processor = tiny_llava(seed=0)
    adapter = LlavaAdapter(model, processor)
    batch = adapter.prepare(IMAGES, PROMPTS)
    calls: list[int] = []
    handles = [
        layer.register_forward_hook(lambda module, args, output, index=i: calls.append(index))
        for i, layer in enumerate(adapter.vision_layers)
    ]
    try:
        with torch.inference_mode():
            encoded = adapter.encode_images(batch, configs)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == list(range(layers_run))
    with torch.inference_mode():
        states = model.model.vision_tower(
            batch.inputs["pixel_values"], output_hidden_states=True
        ).hidden_states
    for b, config in enumerate(configs):
        assert torch.equal(encoded[b].features, states[-2][b, 1:])
        assert (encoded[b].similarity is None) == (config.budget is None or config.method != "nuwa")

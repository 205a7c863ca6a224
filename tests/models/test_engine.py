"""The pruning engine inside real transformers classes (tiny random-weight LLaVA-1.5 and Qwen2.5-VL).

Numbered as in the engine issue: (1) `none` == untouched model, (2) Nüwa keep-all without aggregation == `none`,
(3) per-layer visual tokens and original position ids, (4) batch invariance, (5) cached == uncached greedy,
(6) the hand-computed scoring rows equal eager attention. (7) lives in tests/unit/test_budget.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.attention import ClsRowProbe, QueryRowProbe, attach_probe
from models.budget import PruningConfig
from models.llava import LlavaAdapter
from models.methods import method_names
from models.qwen2_5_vl import Qwen2_5_VLAdapter
from tests.models.tiny import tiny_llava, tiny_qwen

torch.set_num_threads(1)

PROMPTS = ["What color is the circle?", "Locate the red square in the image please", "How many triangles?"]
SIZES = [(112, 112), (168, 112), (112, 140)]


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGES = [_image(i, size) for i, size in enumerate(SIZES)]


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def adapter(request):
    if request.param == "llava":
        model, processor = tiny_llava(seed=0)
        return LlavaAdapter(model, processor)
    model, processor = tiny_qwen(seed=0)
    return Qwen2_5_VLAdapter(model, processor)


def _reference_logits(adapter, batch) -> torch.Tensor:
    """The untouched model on the stock processor output (positions as generate() would pass them)."""
    inputs = dict(batch.inputs)
    if adapter.family == "llava":
        inputs["position_ids"] = adapter.unpruned_positions(batch)
    adapter.controller.finish()
    with torch.inference_mode():
        return adapter.model(**inputs).logits


def test_none_equals_untouched_model(adapter):
    batch = adapter.prepare(IMAGES[:2], PROMPTS[:2])
    assert batch.inputs["attention_mask"].sum(1).unique().numel() == 2, "prompts must differ in length"
    output = adapter.forward(batch, [PruningConfig(method="none")] * 2)
    reference = _reference_logits(adapter, batch)
    valid = batch.inputs["attention_mask"].bool()
    assert output.logits.shape == reference.shape
    torch.testing.assert_close(output.logits[valid], reference[valid], atol=1e-5, rtol=0)
    assert [r.stage1 for r in output.reports] == [r.original for r in output.reports]


@pytest.mark.parametrize("method", ["nuwa", "nuwa_stage1", "random", "pooling", "visionzip", "fastv"])
def test_no_budget_keeps_everything_unchanged(adapter, method):
    batch = adapter.prepare(IMAGES[:2], PROMPTS[:2])
    none = adapter.forward(batch, [PruningConfig(method="none")] * 2)
    output = adapter.forward(batch, [PruningConfig(method=method)] * 2)
    torch.testing.assert_close(output.logits, none.logits, atol=1e-5, rtol=0)
    assert all(r.average == r.original for r in output.reports)


def test_nuwa_keep_all_without_aggregation_equals_none(adapter):
    batch = adapter.prepare(IMAGES[:2], PROMPTS[:2])
    none = adapter.forward(batch, [PruningConfig(method="none")] * 2)
    keep_all = adapter.forward(batch, [PruningConfig(method="nuwa", budget=1.0, aggregation=False)] * 2)
    torch.testing.assert_close(keep_all.logits, none.logits, atol=1e-5, rtol=0)
    assert all(r.stage2 == r.original for r in keep_all.reports)


class _LayerRecorder:
    """Test-side hooks: what each decoder layer really received, and what the LLM was called with."""

    def __init__(self, adapter):
        self.lengths: list[int] = []
        self.cos: list[torch.Tensor] = []
        self.call: dict = {}
        self.handles = [
            layer.register_forward_pre_hook(self._layer_hook, with_kwargs=True)
            for layer in adapter.decoder_layers
        ]
        self.handles.append(adapter.model.register_forward_pre_hook(self._model_hook, with_kwargs=True))

    def _layer_hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.lengths.append(hidden.shape[1])
        self.cos.append(kwargs["position_embeddings"][0].detach().clone())

    def _model_hook(self, module, args, kwargs):
        self.call = {key: kwargs.get(key) for key in ("input_ids", "position_ids")}

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _unpruned_visual_positions(adapter, batch) -> torch.Tensor:
    """Original position ids of the visual tokens of sample 0, computed by the stock model: (N,) or (3, N)."""
    positions = adapter.unpruned_positions(batch)
    is_image = batch.inputs["input_ids"][0] == adapter.image_token_id
    return positions[:, 0, is_image] if positions.dim() == 3 else positions[0, is_image]


@pytest.mark.parametrize("budget", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("method", method_names())
def test_layer_counts_and_original_positions(adapter, method, budget):
    batch = adapter.prepare(IMAGES[1:2], PROMPTS[1:2])
    recorder = _LayerRecorder(adapter)
    try:
        output = adapter.forward(batch, [PruningConfig(method=method, budget=budget)])
    finally:
        recorder.remove()
    report = output.reports[0]
    text_tokens = int(batch.inputs["attention_mask"].sum()) - report.original
    seen = tuple(length - text_tokens for length in recorder.lengths)
    assert seen == report.per_layer
    assert report.average == pytest.approx(sum(seen) / len(seen))
    assert report.stage1 == seen[0] and report.stage2 == seen[-1]
    assert len(report.kept) == report.stage2 and len(report.kept_stage1) == report.stage1
    if method != "none":
        assert report.average < report.original

    cols = report.grid[1]
    original = _unpruned_visual_positions(adapter, batch)
    is_visual = recorder.call["input_ids"][0] == adapter.image_token_id
    fed = recorder.call["position_ids"]
    fed_visual = fed[:, 0, is_visual] if fed.dim() == 3 else fed[0, is_visual]
    kept_index = torch.tensor([r * cols + c for r, c in report.kept_stage1])
    if method == "visionzip":
        # VisionZip compresses positions: the kept tokens take consecutive ids from the image start.
        first = original[..., 0]
        steps = torch.arange(report.stage1)
        expected = first[..., None] + steps if fed.dim() == 3 else first + steps
        torch.testing.assert_close(fed_visual, expected)
    else:
        torch.testing.assert_close(fed_visual, original[..., kept_index])

    # Layers after the LLM-side drop see the rotary tables of the kept tokens' ORIGINAL positions.
    if report.stage2 < report.stage1:
        final_index = torch.tensor([r * cols + c for r, c in report.kept])
        stage1_positions = fed[:, 0] if fed.dim() == 3 else fed[0]
        visual_rows = torch.nonzero(is_visual).flatten()
        kept_rows = visual_rows[torch.searchsorted(kept_index, final_index)]
        rows = torch.cat([torch.nonzero(~is_visual).flatten(), kept_rows]).sort().values
        expected_positions = stage1_positions[..., rows]
        position_ids = expected_positions[:, None] if fed.dim() == 3 else expected_positions[None]
        rotary = adapter.model.model.language_model.rotary_emb
        expected_cos, _ = rotary(torch.zeros(1, dtype=torch.float32), position_ids)
        torch.testing.assert_close(recorder.cos[-1], expected_cos)


CONFIGS = [PruningConfig(method=method, budget=0.5) for method in method_names()] + [
    PruningConfig(method="nuwa", budget=0.25),
    PruningConfig(method="nuwa", budget=0.25, stage2_scoring="last3_max"),
    PruningConfig(method="nuwa", budget=0.25, stage2_scoring="text_cosine"),
    PruningConfig(method="nuwa", budget=0.25, salience_source="distinct"),
    PruningConfig(method="nuwa", budget=0.25, salience_source="attention_distinct", salience_key_norm=True),
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"{c.method}-{c.budget}-{c.stage2_scoring}-{c.salience_source}"
)
def test_batch_invariance(adapter, config):
    alone = adapter.generate(adapter.prepare(IMAGES[:1], PROMPTS[:1]), [config], max_new_tokens=6)
    batch = adapter.prepare(IMAGES, PROMPTS)
    others = [PruningConfig(method="nuwa", budget=0.25), PruningConfig(method="fastv", budget=0.5)]
    together = adapter.generate(batch, [config, *others], max_new_tokens=6)
    assert together.sequences[0] == alone.sequences[0]
    assert together.reports[0].kept == alone.reports[0].kept
    assert together.reports[0].per_layer == alone.reports[0].per_layer


@pytest.mark.parametrize("method", ["none", "nuwa", "fastv", "visionzip"])
def test_generate_with_cache_equals_greedy_without_cache(adapter, method):
    batch = adapter.prepare(IMAGES, PROMPTS)
    configs = [PruningConfig(method=method, budget=0.25), PruningConfig(method="nuwa", budget=0.5)] + [
        PruningConfig(method="fastv", budget=0.75)
    ]
    cached = adapter.generate(batch, configs, max_new_tokens=8, use_cache=True)
    uncached = adapter.generate(batch, configs, max_new_tokens=8, use_cache=False)
    assert cached.sequences == uncached.sequences
    assert all(len(seq) >= 1 for seq in cached.sequences)


def _eager_twin(adapter):
    """A second instance with identical weights running eager attention with output_attentions."""
    if adapter.family == "llava":
        model, _ = tiny_llava(seed=0)
    else:
        model, _ = tiny_qwen(seed=0)
    model.set_attn_implementation("eager")
    return model


def test_scoring_row_equals_eager_attention(adapter):
    batch = adapter.prepare(IMAGES[:2], PROMPTS[:2])
    inputs = dict(batch.inputs)
    inputs["position_ids"] = adapter.unpruned_positions(batch)
    layer = 1
    probe = QueryRowProbe()
    last = inputs["input_ids"].shape[1] - 1
    probe.query_index = {0: [last - 2, last - 1, last], 1: [last]}
    probe.key_valid = inputs["attention_mask"].bool()
    probe.armed = True
    attach_probe(adapter.decoder_layers[layer].self_attn, probe)
    try:
        with torch.inference_mode():
            adapter.model(**inputs)
    finally:
        attach_probe(adapter.decoder_layers[layer].self_attn, None)
    eager = _eager_twin(adapter)
    with torch.inference_mode():
        attentions = eager(**inputs, output_attentions=True).attentions
    reference = attentions[layer]  # (B, H, L, L)
    valid = probe.key_valid
    for sample, rows in probe.query_index.items():
        expected = reference[sample][:, rows][..., valid[sample]]
        torch.testing.assert_close(probe.rows[sample][..., valid[sample]], expected, atol=1e-5, rtol=0)
        assert float(probe.rows[sample][..., ~valid[sample]].abs().sum()) == 0.0


def test_vision_salience_equals_eager_cls_row():
    model, processor = tiny_llava(seed=0)
    adapter = LlavaAdapter(model, processor)
    batch = adapter.prepare(IMAGES[:2], PROMPTS[:2])
    layers = adapter.vision_layers
    probe = ClsRowProbe()
    attach_probe(layers[len(layers) - 2].self_attn, probe)
    pixel_values = batch.inputs["pixel_values"]
    with torch.inference_mode():
        model.model.vision_tower(pixel_values)
    attach_probe(layers[len(layers) - 2].self_attn, None)
    eager, _ = tiny_llava(seed=0)
    eager.set_attn_implementation("eager")
    with torch.inference_mode():
        attentions = eager.model.vision_tower(pixel_values, output_attentions=True).attentions
    expected = attentions[len(layers) - 2][:, :, 0, 1:].sum(dim=1)
    torch.testing.assert_close(probe.salience, expected, atol=1e-5, rtol=0)


def test_qwen_vision_salience_is_received_attention():
    """Column sums from the probe equal a naive full-attention computation of the last vision block."""
    model, processor = tiny_qwen(seed=0)
    adapter = Qwen2_5_VLAdapter(model, processor)
    batch = adapter.prepare(IMAGES[:2], PROMPTS[:2])
    captured = {}
    block = model.model.visual.blocks[-1]

    def grab(module, args, kwargs):
        captured.update(hidden=args[0], cu=kwargs["cu_seqlens"], pe=kwargs["position_embeddings"])

    handle = block.attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        encoded = adapter.encode_images(batch, [PruningConfig()] * 2)
    finally:
        handle.remove()
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    attn = block.attn
    hidden = captured["hidden"]
    qkv = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3)
    q, k = apply_rotary_pos_emb_vision(qkv[0], qkv[1], *captured["pe"])
    columns = []
    bounds = captured["cu"].tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qi, ki = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1)
        probs = (qi @ ki.transpose(-1, -2) * attn.scaling).softmax(-1)  # (H, L, L)
        columns.append(probs.sum(dim=1).mean(dim=0))
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    window_index, _ = get_vision_window_index(
        batch.inputs["image_grid_thw"], spatial_merge_size=2, window_size=visual.window_size, patch_size=14
    )
    expected = torch.cat(columns).view(-1, 4).mean(1)[torch.argsort(window_index)]
    got = torch.cat([e.salience for e in encoded])
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=0)
    assert [e.grid for e in encoded] == [(4, 4), (4, 6)]

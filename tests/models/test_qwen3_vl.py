"""Qwen3-VL (dense and MoE, tiny random-weight configs of the real classes) under every pruning method.

Numbered as in the Qwen3-VL issue: (1) `none` == the untouched model, (2) keep-all without aggregation == `none`,
DeepStack injection included (and shown to matter), (3) per-layer visual-token counts, original 3-D positions,
and the DeepStack features each layer receives == the method applied to that level alone (a hand gather for the
methods that only select), (4) batch invariance with padding and cached == uncached decoding. Loading from a
directory, the frame / token estimates and the box mapping through `ModelRunner` close the file.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from models.budget import PruningConfig
from models.loading import load_runner
from models.methods import method_names
from models.qwen3_vl import Qwen3VLAdapter, Qwen3VLImageOnlyProcessor
from models.runner import ModelRunner
from models.tasks import TaskRequest
from tests.models.tiny import answer_always, tiny_qwen3_vl

torch.set_num_threads(1)

PROMPTS = ["What color is the circle?", "Locate the red square in the image please", "How many triangles?"]
SIZES = [(128, 128), (192, 128), (96, 160)]  # 4x4, 4x6 and 5x3 merged tokens (32-px cells)
ANSWER = (
    '```json\n[{"bbox_2d": [100, 250, 500, 750], "label": "red circle"}, '
    '{"bbox_2d": [600, 0, 1010, 400], "label": "red circle"}]\n```'
)


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGES = [_image(i, size) for i, size in enumerate(SIZES)]


@pytest.fixture(scope="module", params=["dense", "moe"])
def adapter(request) -> Qwen3VLAdapter:
    model, processor = tiny_qwen3_vl(seed=0, moe=request.param == "moe")
    return Qwen3VLAdapter(model, processor)


def _untouched_logits(adapter: Qwen3VLAdapter, batch) -> torch.Tensor:
    """The stock model on the stock processor output: its own vision tower, positions and DeepStack step."""
    adapter.controller.finish()
    with torch.inference_mode():
        return adapter.model(**batch.inputs).logits


# ---- (1) and (2) ---------------------------------------------------------------------------------------------
def test_none_equals_untouched_model(adapter):
    batch = adapter.prepare(IMAGES[:2], PROMPTS[:2])
    assert batch.inputs["attention_mask"].sum(1).unique().numel() == 2, "prompts must differ in length"
    assert batch.inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 12]], "images must differ in size"
    output = adapter.forward(batch, [PruningConfig(method="none")] * 2)
    reference = _untouched_logits(adapter, batch)
    valid = batch.inputs["attention_mask"].bool()
    assert output.logits.shape == reference.shape
    torch.testing.assert_close(output.logits[valid], reference[valid], atol=1e-5, rtol=0)
    assert [r.stage1 for r in output.reports] == [r.original for r in output.reports] == [16, 24]


def test_keep_all_without_aggregation_equals_none_with_deepstack(adapter):
    batch = adapter.prepare(IMAGES[:2], PROMPTS[:2])
    none = adapter.forward(batch, [PruningConfig(method="none")] * 2)
    keep_all = adapter.forward(batch, [PruningConfig(method="nuwa", budget=1.0, aggregation=False)] * 2)
    torch.testing.assert_close(keep_all.logits, none.logits, atol=1e-5, rtol=0)
    assert all(r.stage2 == r.original for r in keep_all.reports)

    # The equality above covers DeepStack only if DeepStack matters: the stock model WITHOUT its DeepStack
    # features answers measurably differently.
    adapter.controller.finish()
    with torch.inference_mode():
        vision = adapter.model.model.get_image_features(
            batch.inputs["pixel_values"], batch.inputs["image_grid_thw"], return_dict=True
        )
        no_deepstack = adapter.model(
            input_ids=batch.inputs["input_ids"],
            attention_mask=batch.inputs["attention_mask"],
            position_ids=adapter.unpruned_positions(batch),
            mm_encoder_outputs={
                "image": BaseModelOutputWithDeepstackFeatures(
                    pooler_output=vision.pooler_output, deepstack_features=[]
                )
            },
        ).logits
    valid = batch.inputs["attention_mask"].bool()
    assert float((no_deepstack[valid] - none.logits[valid]).abs().max()) > 1e-2


@pytest.mark.parametrize("method", ["nuwa", "nuwa_stage1", "random", "pooling", "visionzip", "fastv"])
def test_no_budget_keeps_everything_unchanged(adapter, method):
    batch = adapter.prepare(IMAGES[:2], PROMPTS[:2])
    none = adapter.forward(batch, [PruningConfig(method="none")] * 2)
    output = adapter.forward(batch, [PruningConfig(method=method)] * 2)
    torch.testing.assert_close(output.logits, none.logits, atol=1e-5, rtol=0)
    assert all(r.average == r.original for r in output.reports)


# ---- (3) -----------------------------------------------------------------------------------------------------
class _Recorder:
    """Test-side hooks: each decoder layer's input and, for the DeepStack layers, its output before and after
    the adapter's injection; and what the LLM was called with."""

    def __init__(self, adapter: Qwen3VLAdapter):
        self.inputs: list[torch.Tensor] = []
        self.cos: list[torch.Tensor] = []
        self.raw: dict[int, torch.Tensor] = {}
        self.injected: dict[int, torch.Tensor] = {}
        self.call: dict = {}
        layers = adapter.decoder_layers
        self.handles = [layer.register_forward_pre_hook(self._input, with_kwargs=True) for layer in layers]
        for index in range(adapter.deepstack_levels):
            self.handles.append(
                layers[index].register_forward_hook(self._keep(self.raw, index), prepend=True)
            )
            self.handles.append(layers[index].register_forward_hook(self._keep(self.injected, index)))
        self.handles.append(adapter.model.register_forward_pre_hook(self._call, with_kwargs=True))

    def _input(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.inputs.append(hidden.detach().clone())
        self.cos.append(kwargs["position_embeddings"][0].detach().clone())

    @staticmethod
    def _keep(store, index):
        def hook(module, args, output):
            store[index] = output.detach().clone()

        return hook

    def _call(self, module, args, kwargs):
        self.call = {key: kwargs.get(key) for key in ("input_ids", "position_ids")}

    def remove(self):
        for handle in self.handles:
            handle.remove()


CASES = [
    *[PruningConfig(method=method, budget=budget) for method in method_names() for budget in (0.25, 0.5)],
    PruningConfig(method="nuwa", budget=0.25, aggregation=False),
    PruningConfig(method="fastv", budget=0.25, fastv_layer=1),  # drop before the 2nd and 3rd injections
    PruningConfig(method="nuwa", budget=0.5, stage2_layer=3),  # drop after every injection
    PruningConfig(method="nuwa", budget=0.25, salience_source="distinct"),
]
SELECT_ONLY = {"none", "random", "fastv", "nuwa_stage2"}  # kept features are encoder rows, unchanged


def _case_id(config: PruningConfig) -> str:
    extras = "-noagg" if not config.aggregation else ""
    extras += f"-fastv{config.fastv_layer}" if config.fastv_layer else ""
    extras += f"-k{config.stage2_layer}" if config.stage2_layer else ""
    extras += f"-{config.salience_source}" if config.salience_source != "attention" else ""
    return f"{config.method}-{config.budget}{extras}"


@pytest.mark.parametrize("config", CASES, ids=_case_id)
def test_counts_positions_and_deepstack_rows(adapter, config):
    batch = adapter.prepare(IMAGES[1:2], PROMPTS[1:2])
    recorder = _Recorder(adapter)
    try:
        output = adapter.forward(batch, [config])
    finally:
        recorder.remove()
    report = output.reports[0]

    # Per-layer visual-token counts are what the layers really received.
    text_tokens = int(batch.inputs["attention_mask"].sum()) - report.original
    seen = tuple(hidden.shape[1] - text_tokens for hidden in recorder.inputs)
    assert seen == report.per_layer
    assert report.stage1 == seen[0] and report.stage2 == seen[-1]
    if config.method != "none":
        assert report.average < report.original

    # Kept tokens carry their ORIGINAL 3-D (t, h, w) position ids (VisionZip: dense ids, its own choice).
    cols = report.grid[1]
    positions = adapter.unpruned_positions(batch)
    original = positions[:, 0, batch.inputs["input_ids"][0] == adapter.image_token_id]  # (3, N)
    is_visual = recorder.call["input_ids"][0] == adapter.image_token_id
    fed = recorder.call["position_ids"][:, 0, is_visual]
    kept_stage1 = torch.tensor([r * cols + c for r, c in report.kept_stage1])
    if config.method == "visionzip":
        torch.testing.assert_close(fed, original[:, :1] + torch.arange(report.stage1))
    else:
        torch.testing.assert_close(fed, original[:, kept_stage1])
        assert fed[1].unique().numel() > 1 and fed[2].unique().numel() > 1, "h and w ids must vary"

    # Layers after an LLM-side drop get the rotary tables of the kept tokens' ORIGINAL positions.
    if report.stage2 < report.stage1:
        kept_final = torch.tensor([r * cols + c for r, c in report.kept])
        visual_rows = torch.nonzero(is_visual).flatten()
        kept_rows = visual_rows[torch.searchsorted(kept_stage1, kept_final)]
        rows = torch.cat([torch.nonzero(~is_visual).flatten(), kept_rows]).sort().values
        stage1_positions = recorder.call["position_ids"][:, 0]
        rotary = adapter.model.model.language_model.rotary_emb
        expected_cos, _ = rotary(torch.zeros(1), stage1_positions[:, rows][:, None])
        torch.testing.assert_close(recorder.cos[-1], expected_cos)

    # What each DeepStack layer added == the method applied to that level ALONE (same indices, same weights),
    # at the tokens still present in that layer; for select-only methods also == a plain gather of the tower's
    # own DeepStack output at the kept grid indices. The main features likewise enter layer 0.
    encoded = adapter.encode_images(batch, [config])[0]
    with torch.inference_mode():
        tower = adapter.model.model.visual(
            batch.inputs["pixel_values"], grid_thw=batch.inputs["image_grid_thw"], return_dict=True
        )
    width = adapter.llm_width
    drop_layer = next((i for i, count in enumerate(seen) if count < seen[0]), None)
    stage1_rows = recorder.inputs[0][0, is_visual]
    alone = adapter.stage1(dataclasses.replace(encoded, features=encoded.features[:, :width]), config)
    torch.testing.assert_close(stage1_rows, alone.features, atol=1e-6, rtol=0)
    for level in range(adapter.deepstack_levels):
        added = (recorder.injected[level] - recorder.raw[level])[0]
        added = added[added.abs().sum(dim=-1) > 0]
        levels = encoded.features[:, (level + 1) * width : (level + 2) * width]
        expected = adapter.stage1(dataclasses.replace(encoded, features=levels), config)
        present = kept_stage1 if drop_layer is None or level < drop_layer else kept_final
        rows = torch.isin(expected.source_index, present)
        assert added.shape[0] == seen[level] == int(rows.sum())
        torch.testing.assert_close(added, expected.features[rows], atol=1e-5, rtol=0)
        if config.method in SELECT_ONLY or not config.aggregation:
            hand = tower.deepstack_features[level][present]
            torch.testing.assert_close(added, hand, atol=1e-5, rtol=0)


def test_salience_is_attention_received_in_the_last_block(adapter):
    """The probe's per-token salience equals a naive full-attention column sum of the last vision block."""
    batch = adapter.prepare(IMAGES[:2], PROMPTS[:2])
    visual = adapter.model.model.visual
    block = visual.blocks[-1]
    captured = {}

    def grab(module, args, kwargs):
        captured.update(hidden=args[0], cu=kwargs["cu_seqlens"], pe=kwargs["position_embeddings"])

    handle = block.attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        encoded = adapter.encode_images(batch, [PruningConfig()] * 2)
    finally:
        handle.remove()
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

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
    expected = torch.cat(columns).view(-1, 4).mean(1)
    torch.testing.assert_close(torch.cat([e.salience for e in encoded]), expected.detach(), atol=1e-5, rtol=0)
    assert [e.grid for e in encoded] == [(4, 4), (4, 6)]
    assert encoded[0].features.shape == (16, (1 + adapter.deepstack_levels) * adapter.llm_width)


# ---- (4) -----------------------------------------------------------------------------------------------------
BATCH_CONFIGS = [PruningConfig(method=method, budget=0.5) for method in method_names()] + [
    PruningConfig(method="nuwa", budget=0.25),
    PruningConfig(method="nuwa", budget=0.25, stage2_scoring="last3_max"),
    PruningConfig(method="nuwa", budget=0.25, stage2_scoring="text_cosine"),
    PruningConfig(method="fastv", budget=0.25, fastv_layer=1),
]


@pytest.mark.parametrize("config", BATCH_CONFIGS, ids=lambda c: f"{c.method}-{c.budget}-{c.stage2_scoring}")
def test_batch_invariance(adapter, config):
    alone = adapter.generate(adapter.prepare(IMAGES[:1], PROMPTS[:1]), [config], max_new_tokens=6)
    batch = adapter.prepare(IMAGES, PROMPTS)
    assert batch.inputs["attention_mask"][0].sum() < batch.inputs["attention_mask"].shape[1], "must be padded"
    others = [PruningConfig(method="nuwa", budget=0.25), PruningConfig(method="fastv", budget=0.5)]
    together = adapter.generate(batch, [config, *others], max_new_tokens=6)
    assert together.sequences[0] == alone.sequences[0]
    assert together.reports[0].kept == alone.reports[0].kept
    assert together.reports[0].per_layer == alone.reports[0].per_layer


@pytest.mark.parametrize("method", ["none", "nuwa", "fastv", "visionzip"])
def test_cached_decoding_equals_uncached(adapter, method):
    batch = adapter.prepare(IMAGES, PROMPTS)
    configs = [
        PruningConfig(method=method, budget=0.25),
        PruningConfig(method="nuwa", budget=0.5),
        PruningConfig(method="fastv", budget=0.75, fastv_layer=1),
    ]
    cached = adapter.generate(batch, configs, max_new_tokens=8, use_cache=True)
    uncached = adapter.generate(batch, configs, max_new_tokens=8, use_cache=False)
    assert cached.sequences == uncached.sequences
    assert all(len(sequence) >= 1 for sequence in cached.sequences)


# ---- sizes, loading, boxes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(128, 128), (448, 224), (100, 300), (1000, 37), (37, 37), (640, 480)])
def test_frame_and_token_estimate_match_the_processor(adapter, size):
    batch = adapter.prepare([Image.new("RGB", size, (200, 200, 200))], ["What?"])
    _, grid_h, grid_w = batch.inputs["image_grid_thw"][0].tolist()
    assert adapter.frame_for(size) == batch.frames[0]
    assert adapter.estimate_visual_tokens(size) == grid_h * grid_w // 4
    width, height = batch.frames[0].input_size
    assert (width, height) == (grid_w * 16, grid_h * 16) and width % 32 == 0 and height % 32 == 0


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_loads_from_a_checkpoint_directory(tmp_path, moe):
    model, processor = tiny_qwen3_vl(moe=moe)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    runner = load_runner(tmp_path, device="cpu")
    assert isinstance(runner.adapter, Qwen3VLAdapter) and runner.adapter.family == "qwen3_vl"
    assert type(runner.adapter.model).__name__ == (
        "Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"
    )
    assert runner.box_format == "qwen3_vl_json"
    results, _ = runner.run(
        [TaskRequest(image=IMAGES[1], kind="answer", text="What?", config=PruningConfig(budget=0.25))]
    )
    assert results[0].report.original == 24 and results[0].report.average < 24


def test_loads_a_directory_laid_out_like_the_released_checkpoints(tmp_path):
    """processor_class `Qwen3VLProcessor`, the image processor in preprocessor_config.json, a video processor
    config present: the stock processor would need torchvision; the image-only one loads."""
    model, processor = tiny_qwen3_vl()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    image_processor = config.pop("image_processor")
    image_processor.update(
        image_processor_type="Qwen2VLImageProcessorFast", processor_class="Qwen3VLProcessor"
    )
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(image_processor))
    (tmp_path / "processor_config.json").write_text(
        json.dumps({**config, "processor_class": "Qwen3VLProcessor"})
    )
    video = {"video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor"}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video))
    loaded = Qwen3VLImageOnlyProcessor.from_pretrained(tmp_path)
    assert loaded.image_processor.patch_size == 16 and loaded.image_processor.merge_size == 2
    runner = load_runner(tmp_path, device="cpu")
    assert runner.estimate_visual_tokens((448, 224)) == 55  # 352 x 160 px = 11 x 5 tokens of 32 px
    shutil.rmtree(tmp_path)


def test_runner_maps_bbox_2d_answers_to_original_pixels():
    model, processor = tiny_qwen3_vl()
    answer_always(model, processor, ANSWER)
    runner = ModelRunner(Qwen3VLAdapter(model, processor), name="tiny-qwen3-vl")
    tasks = [
        TaskRequest(image=Image.new("RGB", (448, 224)), kind="ground", text="the red circle"),
        TaskRequest(
            image=Image.new("RGB", (100, 300)),
            kind="ground",
            text="the red circle",
            config=PruningConfig(method="fastv", budget=0.25),
        ),
        TaskRequest(image=Image.new("RGB", (100, 300)), kind="answer", text="What?"),
    ]
    results, _ = runner.run(tasks)
    assert [r.model_input_size for r in results] == [(352, 160), (96, 288), (96, 288)]
    assert results[0].raw_output == ANSWER and results[2].text == ANSWER and results[2].boxes == ()
    wide, tall = results[0].boxes, results[1].boxes
    # 0..1000 of the model input == 0..1000 of the original (a plain resize); 1010 is clamped to the edge.
    assert [box.xyxy for box in wide] == [
        pytest.approx((44.8, 56.0, 224.0, 168.0)),
        pytest.approx((268.8, 0.0, 448.0, 89.6)),
    ]
    assert [box.xyxy for box in tall] == [
        pytest.approx((10.0, 75.0, 50.0, 225.0)),
        pytest.approx((60.0, 0.0, 100.0, 120.0)),
    ]
    assert {box.label for box in wide + tall} == {"red circle"}
    assert results[1].report.method == "fastv" and results[1].report.average < results[1].report.original


def test_bench_shape_is_the_published_qwen3_vl_8b():
    """bench/shapes.py's Qwen3-VL-8B: the published hyper-parameters give the published 8.77 B parameters."""
    from transformers import Qwen3VLForConditionalGeneration

    from bench.shapes import QWEN3_IMAGE_SIDE, QWEN_SPECIALS, build_shape, qwen3_vl_8b_config

    config = qwen3_vl_8b_config({name: i for i, name in enumerate(QWEN_SPECIALS)})
    assert config.vision_config.deepstack_visual_indexes == [8, 16, 24]
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(8.767, abs=0.001)
    smoke = build_shape("qwen3_vl_8b", torch.device("cpu"), smoke=True)
    assert smoke.adapter.family == "qwen3_vl"
    assert smoke.estimate_visual_tokens((QWEN3_IMAGE_SIDE, QWEN3_IMAGE_SIDE)) == 576

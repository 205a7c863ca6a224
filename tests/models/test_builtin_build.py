"""The built-in model: offline tokenizer/processor/model build and reload, training data, training loop."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from models.boxes import parse_boxes
from models.builtin import scenes
from models.builtin.build import NUM_IMAGE_TOKENS, TINY_OVERRIDES, build_builtin, ordinal_code, sincos_2d
from models.builtin.data import (
    IGNORE_INDEX,
    PATCH_TARGET_DIM,
    PROMPT_ATTRIBUTE_CLASSES,
    Example,
    SceneBatches,
    TokenTable,
    attention_target_shares,
    box_patch_shares,
    collate,
    patch_targets,
    phrase_kind,
    prompt_attributes,
    sample_example,
    stage_eval_examples,
)
from models.builtin.tokenizer import LOC_TOKENS
from models.builtin.train import (
    STATE_FILE,
    AttentionTargetLoss,
    PatchHead,
    PhraseHead,
    answer_loss,
    evaluate,
    parse_args,
    rescale_image_tokens,
    train,
)
from models.builtin.training_curve import main as main_curve
from models.builtin.training_curve import plot_curves, read_run


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_builtin")
    build_builtin(out, TINY_OVERRIDES, seed=0)
    return out


@pytest.fixture(scope="module")
def processor(tiny_dir: Path) -> LlavaProcessor:
    return AutoProcessor.from_pretrained(tiny_dir)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def test_reload_offline_with_auto_classes(tiny_dir: Path, processor: LlavaProcessor) -> None:
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    tokenizer = processor.tokenizer
    config = model.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert config.text_config.vocab_size % 64 == 0 and config.text_config.vocab_size >= len(tokenizer)
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    assert config.text_config.num_hidden_layers >= 4
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def test_processor_output_and_chat_template(processor: LlavaProcessor) -> None:
    text = processor.apply_chat_template(_user("Locate the red circle."), add_generation_prompt=True)
    assert text == "USER: <image>\nLocate the red circle. ASSISTANT:"
    full = processor.apply_chat_template(
        _user("What color is the square?") + [{"role": "assistant", "content": "red"}]
    )
    assert full == "USER: <image>\nWhat color is the square? ASSISTANT: red</s>"
    image = scenes.render(scenes.random_scene(random.Random(0), 448, 3))
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == NUM_IMAGE_TOKENS == 144
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id


def test_location_tokens_are_single_contiguous_ids(processor: LlavaProcessor) -> None:
    tokenizer = processor.tokenizer
    ids = tokenizer("<loc_0><loc_999> <loc_500>", add_special_tokens=False)["input_ids"]
    offset = tokenizer.convert_tokens_to_ids("<loc_0>")
    assert ids[0] == offset and ids[1] == offset + 999 and ids[-1] == offset + 500
    assert tokenizer.convert_tokens_to_ids(list(LOC_TOKENS)) == list(range(offset, offset + 1000))
    assert 600 <= len(tokenizer) - 1004 <= 1000  # BPE vocabulary besides the specials


def test_initialisation_is_spatial_and_ordinal(tiny_dir: Path) -> None:
    weights = load_file(tiny_dir / "model.safetensors")
    positions = next(v for k, v in weights.items() if k.endswith("embeddings.position_embedding.weight"))[1:]
    patch = next(v for k, v in weights.items() if k.endswith("embeddings.patch_embedding.weight"))
    assert positions.shape[0] == NUM_IMAGE_TOKENS
    # Proportional to the 2-D sin/cos code, at a magnitude near the patch embedding's (not the 0.02 default).
    code = sincos_2d(12, positions.shape[1])
    assert F.cosine_similarity(positions.flatten(), code.flatten(), dim=0) > 0.999
    assert positions.pow(2).mean().sqrt() > 0.2
    assert patch.abs().max() > 0
    tokens = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    processor = AutoProcessor.from_pretrained(tiny_dir)
    offset = processor.tokenizer.convert_tokens_to_ids("<loc_0>")
    loc = tokens[offset : offset + 1000]
    near = F.cosine_similarity(loc[:-1], loc[1:], dim=1).mean()
    far = F.cosine_similarity(loc[:500], loc[500:], dim=1).mean()
    assert near > 0.98 and far < 0.5
    assert ordinal_code(1000, 32).shape == (1000, 32)


def test_batch_matches_processor_and_masks_prompt(processor: LlavaProcessor) -> None:
    table = TokenTable(processor.tokenizer)
    rng = random.Random(5)
    examples = [sample_example(rng, "all", size) for size in (224, 336, 448, 280)]
    batch = collate(examples, table)
    assert batch["pixel_values"].shape == (4, 3, 336, 336) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["patch_targets"].shape == (4, 144, PATCH_TARGET_DIM)
    for row, example in enumerate(examples):
        messages = _user(example.prompt) + [{"role": "assistant", "content": example.answer}]
        text = processor.apply_chat_template(messages)
        reference = processor(images=[scenes.render(example.scene)], text=[text], return_tensors="pt")
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == reference["input_ids"][0].tolist()
        assert torch.allclose(batch["pixel_values"][row], reference["pixel_values"][0], atol=1e-5)
        labels = batch["labels"][row]
        answer = table.answer_ids(example.answer)
        assert labels[length - len(answer) : length].tolist() == answer
        assert (labels[: length - len(answer)] == IGNORE_INDEX).all() and (
            labels[length:] == IGNORE_INDEX
        ).all()
        assert answer[-1] == processor.tokenizer.eos_token_id
        if example.box is not None:
            (box,) = parse_boxes(example.answer, "loc_tokens", (336, 336))
            size = example.scene.size
            assert scenes.iou([v * size for v in box.xyxy_norm], example.box) > 0.95


def test_stages_draw_their_own_distribution(processor: LlavaProcessor) -> None:
    rng = random.Random(1)
    single = [sample_example(rng, "single", 336) for _ in range(40)]
    assert all(len(e.scene.objects) == 1 for e in single)
    assert {e.kind for e in single} <= {"ground/color_shape", "vqa/color", "vqa/shape"}
    color = [sample_example(rng, "color", 336) for _ in range(40)]
    assert all(2 <= len(e.scene.objects) <= 5 for e in color)
    assert {e.kind for e in color if e.box is not None} == {"ground/color_object"}
    assert phrase_kind("the leftmost circle") == "extremal" and phrase_kind("the circle") == "shape"
    assert stage_eval_examples("color", 6) == stage_eval_examples("color", 6)
    with pytest.raises(ValueError, match="unknown stage"):
        sample_example(rng, "everything", 336)


def test_kind_weights_shift_the_mix_and_keep_items_valid() -> None:
    rng = random.Random(5)
    weights = {"vqa/count": 3.0, "ground/extremal": 2.0}
    drawn = [sample_example(rng, "all", 336, 0.5, weights) for _ in range(2000)]
    kinds = {kind: sum(e.kind == kind for e in drawn) for kind in {e.kind for e in drawn}}
    questions = sum(v for k, v in kinds.items() if k.startswith("vqa/"))
    phrases = len(drawn) - questions
    # count gets 3 of 6 shares of the questions, extremal 2 of 5 shares of the phrases; the rest stay uniform
    assert kinds["vqa/count"] / questions == pytest.approx(0.5, abs=0.05)
    assert kinds["ground/extremal"] / phrases == pytest.approx(0.4, abs=0.05)
    assert kinds["vqa/shape"] / questions == pytest.approx(1 / 6, abs=0.04)
    assert kinds["ground/shape"] / phrases == pytest.approx(0.2, abs=0.04)
    for example in drawn[:200]:  # still contract items: the answer is the scene's truth
        if example.kind == "vqa/count":
            shape = example.prompt.split()[2][:-1]
            assert example.answer == str(sum(o.shape == shape for o in example.scene.objects))
        if example.kind == "ground/extremal":
            assert scenes.grounding_phrases(example.scene).count((example.phrase, _target(example))) == 1
    unweighted = [sample_example(random.Random(9), "all", 336, 0.5) for _ in range(3)]
    assert unweighted == [sample_example(random.Random(9), "all", 336, 0.5, {}) for _ in range(3)]
    with pytest.raises(ValueError, match="stage 'all' only"):
        sample_example(rng, "single", 336, 0.5, weights)


def _target(example: Example) -> int:
    return next(i for i, o in enumerate(example.scene.objects) if tuple(o.box) == tuple(example.box))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vqa/count", "KIND=WEIGHT"),
        ("vqa/colour=2", "KIND=WEIGHT"),
        ("count=2", "KIND=WEIGHT"),
        ("vqa/count=two", "not a number"),
        ("vqa/count=0", "must be > 0"),
    ],
)
def test_kind_weights_flag_rejects_bad_values(
    text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--stage", "all", "--steps", "1", "--kind-weights", text])
    assert message in capsys.readouterr().err


def test_kind_weights_flag_parses() -> None:
    args = parse_args(
        ["--out", "x", "--stage", "all", "--steps", "1", "--kind-weights", "vqa/count=3,ground/shape=0.5"]
    )
    assert args.kind_weights == {"vqa/count": 3.0, "ground/shape": 0.5}
    assert parse_args(["--out", "x", "--stage", "all", "--steps", "1"]).kind_weights == {}


def test_stream_is_a_function_of_seed_and_index(processor: LlavaProcessor) -> None:
    stream = SceneBatches(processor.tokenizer, "single", batch_size=2, seed=3)
    resumed = SceneBatches(processor.tokenizer, "single", batch_size=2, seed=3, start_batch=1)
    first, second = next(iter(stream)), next(iter(resumed))
    assert torch.equal(second["input_ids"], stream.batch(1)["input_ids"])
    assert not torch.equal(first["pixel_values"], second["pixel_values"])


def test_soft_location_loss() -> None:
    torch.manual_seed(0)
    vocab, offset = 1100, 50
    head = torch.nn.Linear(8, vocab, bias=False)
    hidden = torch.randn(2, 3, 8)
    labels = torch.tensor([[IGNORE_INDEX, 7, 9], [IGNORE_INDEX, IGNORE_INDEX, offset + 400]])
    hard, _ = answer_loss(hidden, labels, head, offset, sigma=8.0, soft_weight=0.0)
    logits = head(hidden[:, :-1]).reshape(-1, vocab)
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(hard, expected, atol=1e-6)
    # With the soft target, putting mass on a neighbouring bin costs less than on a far one.
    with torch.no_grad():
        head.weight.zero_()
    near_hidden = torch.zeros(1, 2, 8)
    near_hidden[0, 0, 0] = 1.0
    target = torch.tensor([[IGNORE_INDEX, offset + 400]])
    for bin_index, bucket in ((403, "near"), (700, "far")):
        with torch.no_grad():
            head.weight.zero_()
            head.weight[offset + bin_index, 0] = 10.0
        loss, stats = answer_loss(near_hidden, target, head, offset, sigma=8.0, soft_weight=0.5)
        if bucket == "near":
            near_loss, near_err = loss, stats["loc_abs_err"]
        else:
            far_loss = loss
    assert near_loss < far_loss and near_err == 3.0


def test_example_weighting_averages_each_example_first() -> None:
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 60, bias=False)
    hidden = torch.randn(2, 5, 8)
    # Row 0 has four answer tokens, row 1 has one.
    labels = torch.tensor(
        [[IGNORE_INDEX, 3, 4, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 9]]
    )
    per_token, _ = answer_loss(hidden, labels, head, 50, sigma=8.0, soft_weight=0.0)
    per_example, _ = answer_loss(hidden, labels, head, 50, sigma=8.0, soft_weight=0.0, per_example=True)
    losses = F.cross_entropy(
        head(hidden[:, :-1]).reshape(-1, 60), labels[:, 1:].reshape(-1), reduction="none"
    )
    losses = losses.reshape(2, 4)
    assert torch.allclose(per_token, losses[0].sum().add(losses[1, 3]) / 5, atol=1e-6)
    assert torch.allclose(per_example, (losses[0].mean() + losses[1, 3]) / 2, atol=1e-6)
    assert not torch.allclose(per_token, per_example)


def test_training_curve_keeps_the_last_record_of_a_step_and_plots(tmp_path: Path) -> None:
    first, second = tmp_path / "builtin-single", tmp_path / "builtin-color"
    for run, stage in ((first, "single"), (second, "color")):
        run.mkdir()
        records = [
            {"type": "train", "step": 25, "stage": stage, "loss": 3.0},
            {"type": "eval", "step": 25, "stage": stage, "stage/ground_acc": 0.1, "all/vqa_acc": 0.2},
            {"type": "train", "step": 50, "stage": stage, "loss": 2.0},
            {"type": "train", "step": 25, "stage": stage, "loss": 1.5},  # resumed after a kill: this one wins
        ]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    curve = read_run(first)
    assert curve.stage == "single" and curve.last_step == 50
    assert curve.train[25]["loss"] == 1.5 and curve.evals[25]["stage/ground_acc"] == 0.1
    assert read_run(first, last_step=25).last_step == 25
    out = tmp_path / "curve.png"
    plot_curves([curve, read_run(second)], out)
    main_curve([f"{first}:25", str(second), "--out", str(tmp_path / "cli.png")])
    assert (tmp_path / "cli.png").stat().st_size > 1000
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 500


def _train_args(out: Path, *extra: str) -> list[str]:
    return [
        "--out", str(out), "--stage", "single", "--tiny", "--batch-size", "2", "--num-workers", "0",
        "--eval-items", "4", "--eval-every", "2", "--log-every", "1", "--warmup", "1", *extra,
    ]  # fmt: skip


def test_training_steps_stay_finite_and_change_weights(tmp_path: Path) -> None:
    out = tmp_path / "run"
    record = train(parse_args(_train_args(out, "--steps", "2")))
    assert record["step"] == 2
    hits = record["stage/ground_acc"] * record["stage/ground_n"]  # a share of the scored grounding items
    assert record["stage/ground_n"] >= 1 and hits == pytest.approx(round(hits))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["type"] == "train"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    model = AutoModelForImageTextToText.from_pretrained(out / "checkpoint")
    trained = model.state_dict()
    fresh, _ = build_builtin(None, TINY_OVERRIDES, seed=0)
    changed = [k for k, v in fresh.state_dict().items() if not torch.equal(v, trained[k])]
    assert len(changed) > 10 and all(torch.isfinite(v).all() for v in trained.values())
    metrics = evaluate(
        model, AutoProcessor.from_pretrained(out / "checkpoint"), stage_eval_examples("single", 2)
    )
    assert set(metrics) >= {"ground_acc", "vqa_acc"}


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(parse_args(_train_args(straight, "--steps", "4", "--eval-items", "0")))
    train(parse_args(_train_args(split, "--steps", "4", "--stop-at", "2", "--eval-items", "0")))
    assert torch.load(split / STATE_FILE, weights_only=False)["step"] == 2
    train(parse_args(_train_args(split, "--steps", "4", "--resume", "--eval-items", "0")))
    assert torch.load(split / STATE_FILE, weights_only=False)["step"] == 4
    a = load_file(straight / "checkpoint" / "model.safetensors")
    b = load_file(split / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(ValueError, match="stage"):
        train(parse_args([*_train_args(split, "--steps", "4", "--resume"), "--stage", "color"]))


def test_all_stage_evaluates_on_the_official_set(tmp_path: Path) -> None:
    record = train(
        parse_args([*_train_args(tmp_path / "all", "--steps", "1", "--eval-items", "4"), "--stage", "all"])
    )
    assert record["all/ground_n"] == 2 and record["all/vqa_n"] == 2
    assert not any(key.startswith("stage/") for key in record)


def test_patch_targets_follow_the_drawn_pixels() -> None:
    square = scenes.SceneObject("red", "square", (28, 56, 84, 112))  # exactly patches rows 2-3, columns 1-2
    scene = scenes.Scene(336, (230, 230, 230), (square,))
    targets = patch_targets(scene)
    assert targets.shape == (144, PATCH_TARGET_DIM)
    covered = {row * 12 + col for row in (2, 3) for col in (1, 2)}
    red, square_share = targets[:, 1], targets[:, 7 + 1 + scenes.SHAPES.index("square")]
    assert all(red[i] == 1.0 and square_share[i] == 1.0 for i in covered)
    assert red.sum() == 4.0 and (targets[:, 0] + red == 1.0).all()
    # A 448 px scene: the same object scaled by 4/3 covers the same patches.
    big = scenes.Scene(448, (230, 230, 230), (scenes.SceneObject("red", "circle", (0, 0, 112, 112)),))
    shares = patch_targets(big)[:, 1].reshape(12, 12)
    assert shares[:3, :3].sum() == pytest.approx(torch.pi / 4 * 9, rel=0.02) and shares[3:].sum() == 0


def test_box_patch_shares_cover_the_box() -> None:
    shares = box_patch_shares((28, 56, 84, 112), 336).reshape(12, 12)  # exactly rows 2-3, columns 1-2
    assert shares.sum() == 4.0 and shares[2:4, 1:3].min() == 1.0
    half = box_patch_shares((0, 0, 14, 28), 336).reshape(12, 12)  # half of the first patch
    assert half[0, 0] == pytest.approx(0.5) and half.sum() == pytest.approx(0.5)
    scaled = box_patch_shares((0, 0, 112, 112), 448).reshape(12, 12)  # 448 px: 3 x 3 patches of 37.3 px
    assert scaled[:3, :3].min() == pytest.approx(1.0) and scaled.sum() == pytest.approx(9.0)
    assert not box_patch_shares(None, 336).any()


@torch.no_grad()
def _eager_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> object:
    """The LLaVA body's forward with attention weights (the probe's hooks record its inputs on the way)."""
    return model.model(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        output_attentions=True,
    )


def test_attention_probe_equals_the_eager_attention_of_its_head(processor: LlavaProcessor) -> None:
    torch.manual_seed(0)
    model, _ = build_builtin(None, TINY_OVERRIDES, seed=0)
    model.set_attn_implementation("eager")
    probe = AttentionTargetLoss(model, heads=(1,))
    batch = SceneBatches(
        processor.tokenizer, "color_shape", batch_size=6, seed=5, grounding_fraction=0.5
    ).batch(0)
    grounding = (batch["target_patches"].sum(-1) > 0).nonzero().squeeze(1).tolist()
    assert 0 < len(grounding) < 6  # questions are skipped, not zeroed in
    out = _eager_forward(model, batch)
    with torch.no_grad():
        loss = probe.loss(
            batch["input_ids"], batch["labels"], batch["target_patches"], model.config.image_token_id
        )
    expected = []
    for row in grounding:
        start = int((batch["labels"][row] != IGNORE_INDEX).float().argmax()) - 1
        weights = out.attentions[probe.layers[0]][row, 1, start][
            batch["input_ids"][row] == model.config.image_token_id
        ]
        wanted = batch["target_patches"][row] / batch["target_patches"][row].sum()
        expected.append(-(wanted * (weights / weights.sum()).log()).sum())
    assert probe.layers == (len(model.model.language_model.layers) // 2,)
    assert torch.allclose(loss, torch.stack(expected).mean(), rtol=1e-4)
    probe.remove()


def test_attention_probe_over_layers_heads_positions_and_questions(processor: LlavaProcessor) -> None:
    """Several layers, every head, the first 4 answer positions (only those that predict a real label)."""
    torch.manual_seed(0)
    model, _ = build_builtin(None, TINY_OVERRIDES, seed=0)
    model.set_attn_implementation("eager")
    num_layers = len(model.model.language_model.layers)
    heads = tuple(range(model.config.text_config.num_attention_heads))
    probe = AttentionTargetLoss(model, layers=(0, num_layers - 1), heads=heads, positions=4)
    batch = SceneBatches(processor.tokenizer, "all", batch_size=8, seed=3, grounding_fraction=0.5).batch(0)
    targets = batch["attention_targets"]
    questions = [r for r in range(8) if not batch["target_patches"][r].any() and targets[r].any()]
    assert questions, "some question rows must carry an attention target"
    out = _eager_forward(model, batch)
    with torch.no_grad():
        loss = probe.loss(batch["input_ids"], batch["labels"], targets, model.config.image_token_id)
    per_position = []
    for row in (targets.sum(-1) > 0).nonzero().squeeze(1).tolist():
        labels = batch["labels"][row]
        start = int((labels != IGNORE_INDEX).float().argmax()) - 1
        wanted = targets[row] / targets[row].sum()
        image = batch["input_ids"][row] == model.config.image_token_id
        for position in range(start, start + 4):
            if position + 1 >= labels.shape[0] or labels[position + 1] == IGNORE_INDEX:
                continue
            values = []
            for layer in probe.layers:
                for head in heads:
                    weights = out.attentions[layer][row, head, position][image]
                    values.append(-(wanted * (weights / weights.sum()).log()).sum())
            per_position.append(torch.stack(values).mean())
    assert len(per_position) > len(questions)  # grounding rows add up to 4 positions each
    assert torch.allclose(loss, torch.stack(per_position).mean(), rtol=1e-4)
    probe.remove()


def test_attention_targets_of_questions_are_the_named_objects() -> None:
    scene = scenes.Scene(
        336,
        (230, 230, 230),
        (
            scenes.SceneObject("red", "circle", (0, 0, 56, 56)),
            scenes.SceneObject("blue", "circle", (112, 112, 168, 168)),
            scenes.SceneObject("red", "square", (224, 224, 280, 280)),
        ),
    )

    def target(prompt: str, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        return attention_target_shares(Example(scene, prompt, "x", "k", box)).reshape(12, 12)

    circles = target("How many circles are there?")
    assert circles[0:2, 0:2].sum() == 4 and circles[4:6, 4:6].sum() == 4 and circles.sum() == 8
    assert target("What shape is the blue object?").sum() == 4
    assert target("Is there a red square?")[8:10, 8:10].sum() == 4
    assert not target("Is there a green square?").any()
    grounding = target("Locate the leftmost circle.", (0, 0, 56, 56))
    assert grounding[0:2, 0:2].sum() == 4 and grounding.sum() == 4


def test_patch_head_object_weight_reweighs_only_object_patches() -> None:
    torch.manual_seed(0)
    head = PatchHead(hidden_size=8)
    targets = torch.from_numpy(patch_targets(scenes.random_scene(random.Random(3), 336, 2)))[None]
    features = torch.randn(144, 8)
    out = head.proj(features)[None]
    colour = -(targets[..., :7] * F.log_softmax(out[..., :7], dim=-1)).sum(-1)
    shape = -(targets[..., 7:12] * F.log_softmax(out[..., 7:12], dim=-1)).sum(-1)
    plain = head.loss(features, targets)
    position = plain - (colour + shape).mean()
    assert torch.allclose(plain, head.loss(features, targets, object_weight=1.0))
    weights = 1.0 + 9.0 * (1.0 - targets[..., 0])
    expected = ((colour + shape) * weights).sum() / weights.sum() + position
    assert torch.allclose(head.loss(features, targets, object_weight=10.0), expected, atol=1e-5)
    assert 5.0 < weights.max() <= 10.0 and (weights == 1.0).sum() > 100  # objects cover few patches


def test_patch_head_loss_is_small_for_right_answers() -> None:
    head = PatchHead(hidden_size=8)
    targets = torch.from_numpy(patch_targets(scenes.random_scene(random.Random(2), 336, 3)))[None]
    features = torch.randn(144, 8)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    start = head.loss(features, targets).item()
    for _ in range(50):
        optimizer.zero_grad()
        head.loss(features, targets).backward()
        optimizer.step()
    assert head.loss(features, targets).item() < start


@pytest.mark.parametrize(
    "probe_flags",
    [(), ("--attn-layers", "0,1", "--attn-heads", "all", "--attn-positions", "4", "--attn-questions")],
    ids=["one-head", "layers-heads-questions"],
)
def test_cpu_bf16_training_with_example_weighting_and_attention_loss_stays_finite(
    tmp_path: Path, probe_flags: tuple[str, ...]
) -> None:
    out = tmp_path / "bf16"
    args = _train_args(
        out,
        "--steps",
        "2",
        "--eval-items",
        "0",
        "--precision",
        "bf16",
        "--example-weighting",
        "--attn-weight",
        "0.1",
        *probe_flags,
    )
    train(parse_args(args))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for (
        r
    ) in lines:  # the logged total is exactly the weighted sum of the logged parts (aux 0.5, attention 0.1)
        assert r["loss"] == pytest.approx(
            r["answer_loss"] + 0.5 * r["aux_loss"] + 0.1 * r.get("attn_loss", 0.0)
        )
    assert any(r.get("attn_loss", 0) > 0 for r in lines)
    weights = load_file(out / "checkpoint" / "model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


def test_attention_probe_flags_reject_non_integers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", "--attn-layers", "4,five"])
    assert "comma-separated integers" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (
            "Locate the red circle.",
            (1 + list(scenes.COLORS).index("red"), 1 + scenes.SHAPES.index("circle"), 0),
        ),
        ("Locate the purple object.", (1 + list(scenes.COLORS).index("purple"), 0, 0)),
        (
            "Locate the leftmost diamond.",
            (0, 1 + scenes.SHAPES.index("diamond"), 1 + scenes.EXTREMES.index("leftmost")),
        ),
        ("How many squares are there?", (0, 1 + scenes.SHAPES.index("square"), 0)),
        (
            "Is there a yellow triangle?",
            (1 + list(scenes.COLORS).index("yellow"), 1 + scenes.SHAPES.index("triangle"), 0),
        ),
        ("Describe the scene.", (0, 0, 0)),
    ],
)
def test_prompt_attributes_name_what_the_prompt_names(prompt: str, expected: tuple[int, int, int]) -> None:
    assert prompt_attributes(prompt) == expected


def test_collate_carries_prompt_attributes(processor: LlavaProcessor) -> None:
    examples = [sample_example(random.Random(seed), "color_shape", 336, 1.0) for seed in range(4)]
    batch = collate(examples, TokenTable(processor.tokenizer))
    assert batch["prompt_attributes"].tolist() == [list(prompt_attributes(ex.prompt)) for ex in examples]
    assert all(row[0] > 0 or row[1] > 0 for row in batch["prompt_attributes"].tolist())


def test_phrase_head_reads_the_answer_position_and_learns_it() -> None:
    """Only the residual at the position before the first label counts; a head fits a signal placed there."""
    torch.manual_seed(0)
    batch, length, hidden_size, layer = 12, 7, 16, 1
    labels = torch.full((batch, length), IGNORE_INDEX)
    starts = torch.randint(2, length - 1, (batch,))
    labels[torch.arange(batch), starts + 1] = 5  # first answer token at start + 1, predicted from `start`
    attributes = torch.stack([torch.randint(0, n, (batch,)) for n in (7, 5, 5)], dim=1)
    hidden = torch.randn(batch, length, hidden_size)
    hidden[torch.arange(batch), starts, :7] += 4 * F.one_hot(attributes[:, 0], 7)
    hidden[torch.arange(batch), starts, 7:12] += 4 * F.one_hot(attributes[:, 1], 5)
    hidden[torch.arange(batch), starts, 12:] += 4 * F.one_hot(attributes[:, 2], 5)[:, :4]
    states = [torch.randn_like(hidden), hidden]  # layer 0 is noise; layer 1 carries the attributes
    head = PhraseHead(hidden_size, layer)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        loss, _ = head.loss(states, labels, attributes)
        loss.backward()
        optimizer.step()
    loss, accuracy = head.loss(states, labels, attributes)
    assert accuracy == 1.0 and loss.item() < 0.3
    shifted = labels.roll(1, dims=1)  # the head now reads the wrong position, which holds only noise
    assert head.loss(states, shifted, attributes)[1] < 0.5


def test_training_with_the_phrase_loss_saves_and_resumes_its_head(tmp_path: Path) -> None:
    out = tmp_path / "phrase"
    common = ("--eval-items", "0", "--phrase-weight", "1.0", "--stage", "color_shape")
    train(parse_args([*_train_args(out, "--steps", "3", "--stop-at", "2"), *common]))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # a fresh linear head over layer-normed states is nearly uniform: the summed cross-entropy starts close to
    # the sum of log(class count) of the three attributes; accuracy is a share of the 2 rows of a batch
    uniform = sum(math.log(classes) for classes in PROMPT_ATTRIBUTE_CLASSES)
    assert abs(lines[0]["phrase_loss"] - uniform) < 1.0, (lines[0]["phrase_loss"], uniform)
    assert all(r["phrase_acc"] * 2 == pytest.approx(round(r["phrase_acc"] * 2)) for r in lines)
    state = torch.load(out / STATE_FILE, weights_only=False)
    assert state["phrase_head"] is not None and state["step"] == 2
    train(parse_args([*_train_args(out, "--steps", "3", "--resume"), *common]))
    assert torch.load(out / STATE_FILE, weights_only=False)["step"] == 3
    with pytest.raises(ValueError, match="phrase-weight"):
        train(
            parse_args(
                [*_train_args(out, "--steps", "4", "--resume"), "--eval-items", "0", "--stage", "color_shape"]
            )
        )


def test_rescale_image_tokens_sets_the_mean_norm_and_touches_only_the_projector(
    processor: LlavaProcessor,
) -> None:
    model, _ = build_builtin(None, TINY_OVERRIDES, seed=0)
    torch.nn.init.normal_(model.model.multi_modal_projector.linear_2.bias)  # zeros at init would stay zeros
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    batch = SceneBatches(processor.tokenizer, "color_shape", 3, seed=1).batch(0)
    before, after = rescale_image_tokens(model, batch, 2.5)
    assert before > 0 and after == pytest.approx(2.5, rel=1e-4)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before_weights[k])}
    assert {k.split("multi_modal_projector.")[-1] for k in changed} == {"linear_2.weight", "linear_2.bias"}
    assert len(changed) == 2 and all("multi_modal_projector" in k for k in changed)

"""Training data for the built-in model: scenes drawn straight into tensors, token ids built once.

The stock route (PIL image -> processor -> chat template -> tokenizer, per sample) was the measured bottleneck
(5.6 steps/s even on an H100). Here a batch costs a few numpy operations per image:
    * scenes are drawn with `scenes.render_array`, resized to the model's 336 px input with PIL bicubic (the
      processor's own resample, so training pixels equal inference pixels) and normalised with the CLIP
      mean/std in numpy;
    * every prompt and answer of the scene grammar is tokenised once (`TokenTable`); a sample's ids are
      ``<s> USER: <image>*144 \\n{prompt} ASSISTANT:`` + answer + ``</s>``, exactly what the processor and the
      chat template produce; labels are -100 everywhere except the answer and ``</s>``;
    * per-patch colour/shape shares (`patch_targets`) come from the drawn pixels for the auxiliary loss.

Batches are collated inside a `torch.utils.data.IterableDataset`, so DataLoader workers do the whole job. Batch
number b is a pure function of (seed, b): resuming at step b reproduces the stream exactly, whatever the number
of workers (the DataLoader reads workers round-robin and worker w makes batches w, w + n, ...).

Curriculum stages (`STAGES`), each trained from the previous stage's checkpoint:
    * ``single``: one object; "the {colour} {shape}" grounding, colour and shape questions.
    * ``color``: 2-5 objects; "the {colour} object" grounding, shape-of-colour and colour-of-shape questions.
    * ``color_shape``: 2-5 objects; colour+shape, shape and colour-object grounding; colour, shape, "is there".
    * ``all``: the evaluation distribution (`scenes.make_grounding_item` / `make_vqa_item`, every kind).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from models.boxes import grounding_prompt, quantize
from models.builtin import scenes
from models.builtin.build import GRID_SIDE, IMAGE_SIZE, NUM_IMAGE_TOKENS
from models.builtin.tokenizer import LOC_TOKENS

STAGES: tuple[str, ...] = ("single", "color", "color_shape", "all")
IGNORE_INDEX = -100
_STREAM_STRIDE = 10_000_000  # batch b of seed s draws from training_rng(s * stride + b)

_COLOR_NAMES = tuple(scenes.COLORS)
_COLOR_INDEX = {name: index for index, name in enumerate(_COLOR_NAMES)}
_SHAPE_INDEX = {name: index for index, name in enumerate(scenes.SHAPES)}
PATCH_TARGET_DIM = 12
"""Per visual token: 7 colour shares (background first) + 5 shape shares (background first)."""
PROMPT_ATTRIBUTE_CLASSES: tuple[int, ...] = (
    len(scenes.COLORS) + 1,
    len(scenes.SHAPES) + 1,
    len(scenes.EXTREMES) + 1,
)
"""Classes per prompt attribute (colour, shape, extreme), each with 0 = "not named in the prompt"."""
_WORD = re.compile(r"[a-z]+")
_MEAN = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32) * 255.0
_INV_STD = 1.0 / (np.asarray(OPENAI_CLIP_STD, dtype=np.float32) * 255.0)


@dataclass(frozen=True)
class Example:
    """One training or evaluation item, before tokenisation.

    Attributes:
        scene: The scene to draw.
        prompt: User text after the image ("Locate the red circle." or a question).
        answer: Target text: a word, or four location tokens for grounding.
        kind: "ground/<phrase kind>" or "vqa/<question kind>", for per-kind metrics.
        box: Target box in scene pixels for grounding, else None.
        phrase: The referring expression for grounding ("the red circle"), else None.
    """

    scene: scenes.Scene
    prompt: str
    answer: str
    kind: str
    box: tuple[int, int, int, int] | None = None
    phrase: str | None = None


def phrase_kind(phrase: str) -> str:
    """Kind of a grounding phrase (one of `scenes.PHRASE_KINDS`), read from its words."""
    words = phrase.split()
    if len(words) == 2:
        return "shape"
    if words[1] in scenes.EXTREMES:
        return "extremal"
    if words[2] == "object":
        return "color_object"
    return "color_shape"


def _grounding_example(scene: scenes.Scene, phrase: str, target: int, kind: str) -> Example:
    box = scene.objects[target].box
    answer = "".join(f"<loc_{quantize(v, scene.size)}>" for v in box)
    return Example(scene, grounding_prompt(phrase, "loc_tokens"), answer, f"ground/{kind}", box, phrase)


def _vqa_example(item: scenes.VQAItem) -> Example:
    return Example(item.scene, item.question, item.answer, f"vqa/{item.kind}")


def _weighted_kind(
    rng: random.Random, task: str, kinds: tuple[str, ...], weights: dict[str, float] | None
) -> list[str] | None:
    """[one of `kinds`] drawn with the relative `weights`, keyed like `Example.kind` ("vqa/count"; unnamed: 1).

    None without weights, so the `scenes` item makers draw their kind themselves and the stream stays the
    evaluation distribution, identical to runs made before weights existed.
    """
    if not weights:
        return None
    return rng.choices(kinds, weights=[weights.get(f"{task}/{kind}", 1.0) for kind in kinds])[:1]


def _stage_grounding(
    rng: random.Random, stage: str, size: int, kind_weights: dict[str, float] | None = None
) -> Example:
    if stage == "all":
        kinds = _weighted_kind(rng, "ground", scenes.PHRASE_KINDS, kind_weights)
        item = scenes.make_grounding_item(rng, size, kinds)
        return _grounding_example(item.scene, item.phrase, item.target, item.kind)
    kinds = {"single": ("color_shape",), "color": ("color_object",)}.get(
        stage, ("color_shape", "shape", "color_object")
    )
    while True:
        count = 1 if stage == "single" else rng.randint(2, scenes.MAX_OBJECTS)
        scene = scenes.random_scene(rng, size, count)
        options = [(p, t) for p, t in scenes.grounding_phrases(scene) if phrase_kind(p) in kinds]
        if options:
            phrase, target = rng.choice(options)
            return _grounding_example(scene, phrase, target, phrase_kind(phrase))


def _stage_vqa(
    rng: random.Random, stage: str, size: int, kind_weights: dict[str, float] | None = None
) -> Example:
    if stage == "all":
        kinds = _weighted_kind(rng, "vqa", scenes.QUESTION_KINDS, kind_weights)
        return _vqa_example(scenes.make_vqa_item(rng, size, kinds))
    kinds = ("color", "shape", "exists") if stage == "color_shape" else ("color", "shape")
    while True:
        count = 1 if stage == "single" else rng.randint(2, scenes.MAX_OBJECTS)
        scene = scenes.random_scene(rng, size, count)
        options = [q for q in scenes.vqa_questions(scene, rng) if q.kind in kinds]
        wanted = rng.choice(kinds)
        options = [q for q in options if q.kind == wanted] or options
        if options:
            return _vqa_example(rng.choice(options))


def sample_example(
    rng: random.Random,
    stage: str,
    size: int,
    grounding_fraction: float = 0.6,
    kind_weights: dict[str, float] | None = None,
) -> Example:
    """Draw one example of `stage` on a square scene of side `size`.

    Args:
        rng: The random stream (training streams come from `scenes.training_rng`).
        stage: One of `STAGES`.
        size: Scene side in pixels.
        grounding_fraction: Probability of a grounding item (the rest are questions); grounding is the slower
            task to learn, so it gets the larger share.
        kind_weights: Stage ``all`` only: relative sampling weights of phrase and question kinds, keyed like
            `Example.kind` ("ground/extremal", "vqa/count"; unnamed kinds weigh 1). None or empty keeps the
            evaluation distribution (uniform kinds). It lets the weakest kinds get more of the steps: at stage
            ``all`` step 2500 counting scored 0.70 on 250 evaluation questions, mostly one too many (2 -> 3, 3 -> 4
            and 4 -> 5 in 40-58% of those items), while colour, shape and "is there" questions scored 0.96-1.0.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    if kind_weights and stage != "all":
        raise ValueError("kind_weights apply to stage 'all' only")
    if rng.random() < grounding_fraction:
        return _stage_grounding(rng, stage, size, kind_weights)
    return _stage_vqa(rng, stage, size, kind_weights)


def stage_eval_examples(stage: str, count: int, seed: int = scenes.EVAL_SEED) -> list[Example]:
    """A fixed held-out set of `stage` items at the evaluation size, half grounding and half questions.

    Drawn from an even-seeded stream (training streams are odd, see `scenes.training_rng`), so it never
    overlaps training; regenerated identically on every call.
    """
    rng = random.Random(2 * (seed + 7919))
    grounding = [_stage_grounding(rng, stage, scenes.EVAL_SIZE) for _ in range((count + 1) // 2)]
    return grounding + [_stage_vqa(rng, stage, scenes.EVAL_SIZE) for _ in range(count // 2)]


def official_eval_examples(count: int) -> list[Example]:
    """The first `count` grounding and `count` VQA items of the committed evaluation set (scenes.md)."""
    grounding, vqa = scenes.evaluation_set(num_grounding=count, num_vqa=count)
    return [_grounding_example(g.scene, g.phrase, g.target, g.kind) for g in grounding] + [
        _vqa_example(q) for q in vqa
    ]


def image_array(scene: scenes.Scene) -> np.ndarray:
    """The scene as the model's input RGB, `uint8` of shape (336, 336, 3) (bicubic resize when S != 336)."""
    return _to_input_size(scenes.render_array(scene))


def _to_input_size(array: np.ndarray) -> np.ndarray:
    if array.shape[0] != IMAGE_SIZE or array.shape[1] != IMAGE_SIZE:
        resized = Image.fromarray(array).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        array = np.asarray(resized)
    return array


def normalise(array: np.ndarray) -> np.ndarray:
    """CLIP normalisation of `uint8` (H, W, 3) RGB into `float32` (3, H, W), as the processor does."""
    return ((array.astype(np.float32) - _MEAN) * _INV_STD).transpose(2, 0, 1)


class TokenTable:
    """Token ids of every prompt and answer piece, computed once so batches need no tokenizer calls.

    Unseen texts (outside the scene grammar) are tokenised on first use and cached.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self.bos_id = int(tokenizer.bos_token_id)
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self.image_id = int(tokenizer.convert_tokens_to_ids(tokenizer.image_token))
        self.loc_offset = int(tokenizer.convert_tokens_to_ids(LOC_TOKENS[0]))
        self.user_ids = self._encode("USER: ")
        self._cache: dict[str, list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self._encode(text)
        return self._cache[text]

    def prompt_ids(self, prompt: str) -> list[int]:
        """``<s> USER: <image>*144 \\n{prompt} ASSISTANT:`` as ids."""
        tail = self.encode(f"\n{prompt} ASSISTANT:")
        return [self.bos_id, *self.user_ids, *([self.image_id] * NUM_IMAGE_TOKENS), *tail]

    def answer_ids(self, answer: str) -> list[int]:
        """`` {answer}</s>`` as ids (the space is the chat template's)."""
        return [*self.encode(f" {answer}"), self.eos_id]


def prompt_attributes(prompt: str) -> tuple[int, int, int]:
    """Which colour, shape and extreme the prompt names (1-based indices; 0 when it names none).

    The target of the phrase loss in `models/train.py`. "How many circles are there?" names "circle".
    """
    words = _WORD.findall(prompt.lower())
    stems = [word[:-1] if word.endswith("s") and word[:-1] in _SHAPE_INDEX else word for word in words]
    colour = next((_COLOR_INDEX[w] + 1 for w in stems if w in _COLOR_INDEX), 0)
    shape = next((_SHAPE_INDEX[w] + 1 for w in stems if w in _SHAPE_INDEX), 0)
    extreme = next((scenes.EXTREMES.index(w) + 1 for w in stems if w in scenes.EXTREMES), 0)
    return colour, shape, extreme


def collate(examples: list[Example], table: TokenTable) -> dict[str, torch.Tensor]:
    """Batch examples for training: right padding, labels only on answer tokens and `</s>`.

    Returns:
        pixel_values `torch.FloatTensor` (B, 3, 336, 336); input_ids, labels `torch.LongTensor` (B, L);
        attention_mask `torch.LongTensor` (B, L); patch_targets `torch.FloatTensor` (B, 144, 12), see
        `patch_targets`; target_patches `torch.FloatTensor` (B, 144), see `box_patch_shares` (zeros for questions);
        attention_targets `torch.FloatTensor` (B, 144), see `attention_target_shares` (questions too);
        prompt_attributes `torch.LongTensor` (B, 3), see `prompt_attributes`.
    """
    sequences, label_rows = [], []
    for example in examples:
        prompt, answer = table.prompt_ids(example.prompt), table.answer_ids(example.answer)
        sequences.append(prompt + answer)
        label_rows.append([IGNORE_INDEX] * len(prompt) + answer)
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(examples), length), table.pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(zip(sequences, label_rows, strict=True)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    arrays = [scenes.render_array(example.scene) for example in examples]
    pixels = np.stack([normalise(_to_input_size(a)) for a in arrays])
    patches = np.stack([patch_targets(example.scene, a) for example, a in zip(examples, arrays, strict=True)])
    boxes = np.stack([box_patch_shares(example.box, example.scene.size) for example in examples])
    return {
        "pixel_values": torch.from_numpy(pixels),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "patch_targets": torch.from_numpy(patches),
        "target_patches": torch.from_numpy(boxes),
        "attention_targets": torch.from_numpy(
            np.stack([attention_target_shares(example) for example in examples])
        ),
        "prompt_attributes": torch.tensor([prompt_attributes(example.prompt) for example in examples]),
    }


def box_patch_shares(box: tuple[int, int, int, int] | None, size: int) -> np.ndarray:
    """Share of each of the 12x12 patches that a grounding target's box covers (zeros when there is no box).

    The target of the attention loss in `models/train.py`: where the model should look to answer.

    Args:
        box: Target box [x1, y1, x2, y2] in scene pixels (x2, y2 exclusive), or None for a question.
        size: Scene side in pixels (the patch grid spans the whole scene whatever its size).

    Returns:
        `float32` array of shape (144,), row-major like the visual tokens, each value in [0, 1].
    """
    if box is None:
        return np.zeros(GRID_SIDE * GRID_SIDE, dtype=np.float32)
    edges = np.arange(GRID_SIDE + 1) * (size / GRID_SIDE)
    x1, y1, x2, y2 = box
    cover_x = np.clip(np.minimum(edges[1:], x2) - np.maximum(edges[:-1], x1), 0, None) / (size / GRID_SIDE)
    cover_y = np.clip(np.minimum(edges[1:], y2) - np.maximum(edges[:-1], y1), 0, None) / (size / GRID_SIDE)
    return np.outer(cover_y, cover_x).ravel().astype(np.float32)


def attention_target_shares(example: Example) -> np.ndarray:
    """Where the model should look to answer `example`: `box_patch_shares` of every object the prompt is about.

    A grounding item looks at its target box. A question looks at the objects matching the colour and shape it
    names: "What color is the circle?" at the circle, "How many squares are there?" at every square, "Is there
    a red circle?" at the red circle when there is one. Zeros when nothing matches ("no" answers, zero
    counts), so such rows carry no attention target. Measured at stage ``all`` step 1750: the supervised head
    found the named object in 72% of grounding items, yet the first location token pointed at that object in
    only half of those, and colour questions (which need the same binding) scored 16-36%.

    Returns:
        `float32` array of shape (144,), row-major like the visual tokens.
    """
    if example.box is not None:
        return box_patch_shares(example.box, example.scene.size)
    colour, shape, _ = prompt_attributes(example.prompt)
    shares = np.zeros(GRID_SIDE * GRID_SIDE, dtype=np.float32)
    if not colour and not shape:
        return shares
    for obj in example.scene.objects:
        if colour and obj.color != _COLOR_NAMES[colour - 1]:
            continue
        if shape and obj.shape != scenes.SHAPES[shape - 1]:
            continue
        shares += box_patch_shares(obj.box, example.scene.size)
    return shares


def patch_targets(scene: scenes.Scene, array: np.ndarray | None = None) -> np.ndarray:
    """What each of the 12x12 visual tokens shows, for the auxiliary dense loss (models/train.py).

    For every patch of the 336 px input frame: the pixel share of background and of each colour (7 values),
    the pixel share of background and of each shape (5 values), each summing to 1. Pixels are assigned to
    patches by their position scaled to the grid, so any scene size S works.

    Args:
        scene: The scene.
        array: Its `render_array` output, if already drawn.

    Returns:
        `float32` array of shape (144, 12): colour shares then shape shares.
    """
    if array is None:
        array = scenes.render_array(scene)
    size = scene.size
    num_patches = GRID_SIDE * GRID_SIDE
    cells = (np.arange(size) * GRID_SIDE) // size  # grid row/column of each pixel row/column
    per_cell = np.bincount(cells, minlength=GRID_SIDE).astype(np.float64)
    patch_pixels = np.outer(per_cell, per_cell).ravel()
    colors = np.zeros((num_patches, 7))
    shapes = np.zeros((num_patches, 5))
    background = np.asarray(scene.background, dtype=np.uint8)
    for obj in scene.objects:  # objects never overlap, so their pixels can be counted box by box
        x1, y1, x2, y2 = obj.box
        drawn = (array[y1:y2, x1:x2] != background).any(axis=-1)  # colours never equal a background
        patch = cells[y1:y2, None] * GRID_SIDE + cells[None, x1:x2]
        counts = np.bincount(patch[drawn], minlength=num_patches)
        colors[:, _COLOR_INDEX[obj.color] + 1] += counts
        shapes[:, _SHAPE_INDEX[obj.shape] + 1] += counts
    colors[:, 0] = patch_pixels - colors[:, 1:].sum(axis=1)
    shapes[:, 0] = patch_pixels - shapes[:, 1:].sum(axis=1)
    colors /= patch_pixels[:, None]
    shapes /= patch_pixels[:, None]
    return np.concatenate([colors, shapes], axis=1).astype(np.float32)


class SceneBatches(torch.utils.data.IterableDataset):
    """Endless stream of collated training batches for one curriculum stage.

    Args:
        tokenizer: The built-in tokenizer (ids are precomputed from it).
        stage: One of `STAGES`.
        batch_size: Examples per batch.
        seed: Training seed (>= 0).
        start_batch: Index of the first batch to yield; set to the step count when resuming.
        sizes: Scene sides to sample from (each image is resized to 336).
        grounding_fraction: Share of grounding items.
        kind_weights: Relative weights of phrase and question kinds (`sample_example`).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stage: str,
        batch_size: int,
        seed: int = 0,
        start_batch: int = 0,
        sizes: tuple[int, ...] = scenes.TRAIN_SIZES,
        grounding_fraction: float = 0.6,
        kind_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self.table = TokenTable(tokenizer)
        self.stage = stage
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.sizes = sizes
        self.grounding_fraction = grounding_fraction
        self.kind_weights = dict(kind_weights or {})

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch number `index` of this stream (a pure function of seed and index)."""
        rng = scenes.training_rng(self.seed * _STREAM_STRIDE + index)
        examples = [
            sample_example(
                rng, self.stage, rng.choice(self.sizes), self.grounding_fraction, self.kind_weights
            )
            for _ in range(self.batch_size)
        ]
        return collate(examples, self.table)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start_batch + worker
        while True:
            yield self.batch(index)
            index += num_workers


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(dataset: SceneBatches, num_workers: int) -> torch.utils.data.DataLoader:
    """DataLoader over already-collated batches; workers keep one torch thread each."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=2 if num_workers else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


__all__ = [
    "IGNORE_INDEX",
    "STAGES",
    "Example",
    "SceneBatches",
    "TokenTable",
    "box_patch_shares",
    "collate",
    "image_array",
    "PATCH_TARGET_DIM",
    "make_loader",
    "patch_targets",
    "normalise",
    "official_eval_examples",
    "phrase_kind",
    "sample_example",
    "stage_eval_examples",
]

"""The built-in model's tokenizer: a small byte-level BPE trained offline, wrapped as a transformers tokenizer.

No tokenizer can be downloaded here, so one is trained in about a second with `tokenizers` on text generated
from the scene grammar (shared/specs/scenes.md, words from models.builtin.scenes) plus the chat template and a little general English. Byte-level
BPE means any text still encodes (unknown words fall back to bytes), while the scene vocabulary gets whole-word
tokens, which keeps prompts short for a CPU model.

Special tokens (each one id, never split):
    ``<s>`` bos (prepended by the post-processor, as Llama does), ``</s>`` eos (ends every answer),
    ``<pad>``, ``<image>`` (the LLaVA placeholder the processor repeats once per visual token) and the 1000
    Florence-2 location tokens ``<loc_0>`` .. ``<loc_999>`` (see models/boxes.py), given contiguous ids so
    the trainer can address them as one slice of the vocabulary.

Chat format is LLaVA-1.5's: ``USER: <image>\\n{text} ASSISTANT: {answer}</s>``; generation prompts end at
``ASSISTANT:``. Padding is on the left, which batched greedy generation needs.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from models.boxes import LOC_BINS
from models.builtin.scenes import COLORS, EXTREMES, SHAPES

logger = logging.getLogger(__name__)

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
LOC_TOKENS: tuple[str, ...] = tuple(f"<loc_{k}>" for k in range(LOC_BINS))
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, *LOC_TOKENS)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- ' ' if not loop.first else '' }}{{- 'USER: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ASSISTANT: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '</s>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ' ASSISTANT:' -}}{%- endif -%}"
)

_COLOURS = tuple(COLORS)
_GENERAL_TEXT = (
    "Describe the image. What is in this picture? There are some objects on a light background.",
    "Please provide the bounding box coordinate of the region this sentence describes:",
    "Locate the object in the image, output its bbox coordinates using JSON format.",
    "Answer the question using a single word or phrase. Yes, no, left, right, top, bottom, center, middle.",
    "Which one is bigger or smaller? Count the objects. How many are there in total? None, one, two,",
    "three, four, five, six, seven, eight, nine, ten. The answer is. I am not sure. Thank you.",
    "A photo of a cat, a dog, a person, a car, a tree, a house, a table, a chair, a book, a cup.",
    "color colour shape size position image picture scene object objects thing things where what which",
)


def corpus_lines() -> Iterator[str]:
    """Text the BPE is trained on: every scene phrase, question and answer, in chat form, plus general text."""
    phrases = [f"the {c} {s}" for c, s in itertools.product(_COLOURS, SHAPES)]
    phrases += [f"the {s}" for s in SHAPES] + [f"the {c} object" for c in _COLOURS]
    phrases += [f"the {e} {s}" for e, s in itertools.product(EXTREMES, SHAPES)]
    questions = [(f"What color is the {s}?", c) for s, c in itertools.product(SHAPES, _COLOURS)]
    questions += [(f"What shape is the {c} object?", s) for c, s in itertools.product(_COLOURS, SHAPES)]
    questions += [(f"How many {s}s are there?", str(n)) for s, n in itertools.product(SHAPES, range(6))]
    questions += [
        (f"Is there a {c} {s}?", a) for c, s, a in itertools.product(_COLOURS, SHAPES, ("yes", "no"))
    ]
    for phrase in phrases:
        yield f"USER: \nLocate {phrase}. ASSISTANT: "
        yield f"{phrase.capitalize()}."
    for question, answer in questions:
        yield f"USER: \n{question} ASSISTANT: {answer}"
        yield f"{answer.capitalize()}. {answer}."
    yield from _GENERAL_TEXT


def train_tokenizer(lines: Iterable[str] | None = None, vocab_size: int = 1800) -> Tokenizer:
    """Train the byte-level BPE with the special tokens at the front of the vocabulary.

    Args:
        lines: Training text; `corpus_lines()` when None. The corpus is small and repeated, so the BPE stops
            merging once every frequent word is one token, whatever `vocab_size` allows.
        vocab_size: Upper bound including the 1004 special tokens.

    Returns:
        A `tokenizers.Tokenizer` with ids 0..3 = <s>, </s>, <pad>, <image> and 4..1003 = <loc_0>..<loc_999>.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = list(lines) if lines is not None else list(corpus_lines())
    tokenizer.train_from_iterator(text * 4, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    logger.info("trained BPE: %d tokens (%d special)", tokenizer.get_vocab_size(), len(SPECIAL_TOKENS))
    return tokenizer


def build_tokenizer(lines: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """The transformers tokenizer the processor and model use: specials named, chat template, left padding."""
    backend = train_tokenizer(lines)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )
    loc_ids = tokenizer.convert_tokens_to_ids(list(LOC_TOKENS))
    if loc_ids != list(range(loc_ids[0], loc_ids[0] + LOC_BINS)):
        raise RuntimeError("location tokens must have contiguous ids")
    return tokenizer


def loc_token_offset(tokenizer: PreTrainedTokenizerFast) -> int:
    """Id of `<loc_0>`; `<loc_k>` is this plus k (checked when the tokenizer is built)."""
    return int(tokenizer.convert_tokens_to_ids(LOC_TOKENS[0]))


__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IMAGE_TOKEN",
    "LOC_TOKENS",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "corpus_lines",
    "loc_token_offset",
    "train_tokenizer",
]

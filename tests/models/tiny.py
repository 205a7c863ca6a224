"""Tiny random-weight instances of the REAL transformers VLM classes, built offline for the engine tests.

All use the stock processors, so the tests exercise the same tokenisation, image-token expansion and (for Qwen)
dynamic-resolution path as a real checkpoint; only the sizes are small.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.configuration_clip import CLIPVisionConfig
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from models.qwen2_5_vl import Qwen2_5_VLImageOnlyProcessor
from models.qwen3_vl import Qwen3VLImageOnlyProcessor

CORPUS = [
    "What color is the circle? Locate the red square. How many triangles are there? Is there a blue diamond?",
    "USER: ASSISTANT: describe the image in one word please yes no green purple orange yellow",
    "the leftmost rightmost topmost bottommost object shape 0 1 2 3 4 5 6 7 8 9",
]
LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _bpe(specials: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return tokenizer


@functools.cache
def _tokenizer_json(kind: str) -> str:
    """Train the tiny BPE once per kind; each model gets a fresh tokenizer object from it."""
    return _bpe(LLAVA_SPECIALS if kind == "llava" else QWEN_SPECIALS).to_str()


def tiny_llava(
    seed: int = 0, image_size: int = 112, text_layers: int = 4
) -> tuple[torch.nn.Module, LlavaProcessor]:
    """LLaVA (CLIP 112 px, patch 14 -> 8x8 = 64 visual tokens) + Llama, random weights."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json("llava")),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.padding_side = "left"
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.1,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json("qwen")),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_qwen(
    seed: int = 0,
    max_pixels: int = 224 * 224,
    text_layers: int = 4,
    vision_depth: int = 2,
    fullatt_block_indexes: tuple[int, ...] = (1,),
):
    """Qwen2.5-VL with dynamic resolution (patch 14, merge 2, 2x2-token windows), random weights."""
    tokenizer = _qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "eos_token_id": ids["<|im_end|>"],
            "bos_token_id": None,
            "pad_token_id": ids["<|endoftext|>"],
            "initializer_range": 0.1,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": list(fullatt_block_indexes),
            "initializer_range": 0.1,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=56 * 56,
        max_pixels=max_pixels,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    processor = Qwen2_5_VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def tiny_qwen3_vl(seed: int = 0, max_pixels: int = 256 * 256, text_layers: int = 4, moe: bool = False):
    """Qwen3-VL (dense, or MoE with 4 experts, top-2) with dynamic resolution, random weights.

    The real family's structure at toy widths: patch 16, merge 2, interleaved M-RoPE, a learned 8x8 position grid
    resampled per image, and THREE DeepStack levels (vision blocks 0, 1, 2 of 4), like the released checkpoints'
    three (blocks 8, 16, 24 of 27). With 4 LLM layers the default stage-2 layer (2) comes before the last DeepStack
    injection (after layer 2), so the tests also cover a drop inside the DeepStack layers.
    """
    tokenizer = _qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": text_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        "eos_token_id": ids["<|im_end|>"],
        "bos_token_id": None,
        "pad_token_id": ids["<|endoftext|>"],
        "initializer_range": 0.1,
    }
    if moe:
        text_config.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    vision_config = {
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1, 2],
        "initializer_range": 0.1,
    }
    config_class, model_class = (
        (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)
        if moe
        else (Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    )
    config = config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=64 * 64,
        max_pixels=max_pixels,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Qwen3VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def answer_always(model: torch.nn.Module, processor, answer: str) -> None:
    """Make a tiny Qwen-family model answer exactly `answer` to any image, prompt and budget (in place).

    For tests of what happens AFTER generation (box parsing, the mapping to original pixels, the served
    response): a random model never writes a box, so this one is built to. `answer` becomes ONE added token; every
    decoder layer's attention and MLP output projections are zeroed, so each position's last hidden state is its
    own input embedding (a bigram model); the prompt's last token (the newline after `assistant`) and the answer
    token get orthogonal embeddings, and the LM head maps the first to the answer token and the second to the
    end-of-turn token. The vision tower, pruning, positions and reports run unchanged.
    """
    from models.qwen2_5_vl import QWEN_FALLBACK_TEMPLATE

    tokenizer = processor.tokenizer
    tokenizer.add_tokens([answer])
    model.resize_token_embeddings(len(tokenizer))
    answer_id = tokenizer.convert_tokens_to_ids(answer)
    last_prompt_id = tokenizer(QWEN_FALLBACK_TEMPLATE.format(prompt="x"))["input_ids"][-1]
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    language_model = model.model.language_model
    with torch.no_grad():
        for layer in language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        language_model.norm.weight.fill_(1.0)
        embed = language_model.embed_tokens.weight
        embed[last_prompt_id] = 0.0
        embed[last_prompt_id, 0] = 1.0
        embed[answer_id] = 0.0
        embed[answer_id, 1] = 1.0
        head = model.lm_head.weight
        head.zero_()
        head[answer_id, 0] = 1.0
        head[end_id, 1] = 1.0
    model.config.text_config.vocab_size = len(tokenizer)


def save_tiny_llava(directory: Path) -> Path:
    """A tiny LLaVA saved as a checkpoint directory (config, weights, processor) that `load_runner` reads."""
    model, processor = tiny_llava()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory

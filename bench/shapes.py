"""Full-size model SHAPES with random weights: Qwen2.5-VL-7B, LLaVA-1.5-7B and Qwen3-VL-8B, for GPU timing runs.

Random weights give real timings (the same matmuls, the same attention lengths) without a checkpoint, which
cannot be downloaded here. The configs are written from the published hyper-parameters:

* Qwen2.5-VL-7B-Instruct: LLM hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944, vocab 152064,
  M-RoPE sections (16, 24, 24), rope theta 1e6; vision depth 32, hidden 1280, 16 heads, intermediate 3420,
  patch 14, spatial merge 2, window 112, full-attention blocks 7/15/23/31, output 3584.
* LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, hidden 1024, 16 heads, intermediate 4096) + a 2-layer GELU
  projector + Llama-2-7B (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32064).
* Qwen3-VL-8B-Instruct: LLM hidden 4096, 36 layers, 32 heads, 8 KV heads, head dim 128, intermediate 12288,
  vocab 151936, interleaved M-RoPE sections (24, 20, 20), rope theta 5e6, untied head; vision depth 27, hidden
  1152, 16 heads, intermediate 4304, patch 16, spatial merge 2, 2304 learned positions, DeepStack blocks 8/16/24,
  output 4096 (8.77 B parameters in all).

The processors are the stock ones around a small offline tokenizer (the prompt's text tokens differ from the real
tokenizers by a few tokens; visual tokens, which dominate, are exact: 576 for LLaVA at 336 px, and for Qwen
(H/28) x (W/28) merged tokens, 576 at 672 px; Qwen3-VL (H/32) x (W/32), 576 at 768 px). `smoke=True` shrinks every width and depth so the same code path
runs on a CPU in seconds (tests and dry runs); the timings of a smoke model mean nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

logger = logging.getLogger(__name__)

SHAPES = ("llava_1_5_7b", "qwen2_5_vl_7b", "qwen3_vl_8b")
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
QWEN_IMAGE_SIDE = 672  # 24 x 24 = 576 merged visual tokens, the same count as LLaVA-1.5 at 336 px
QWEN3_IMAGE_SIDE = 768  # Qwen3-VL's 32-px merged tokens: 24 x 24 = 576 as well


def _shrink(values: dict[str, Any], smoke: bool, widths: dict[str, int]) -> dict[str, Any]:
    return {**values, **widths} if smoke else values


def _qwen_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from models.builtin.tokenizer import corpus_lines

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=QWEN_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    lines = [line for _, line in zip(range(5000), corpus_lines(), strict=False)]
    tokenizer.train_from_iterator(lines, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    wrapped.padding_side = "left"
    return wrapped


def build_llava_1_5_7b(
    device: torch.device, dtype: torch.dtype, smoke: bool = False, llm: dict[str, int] | None = None
) -> tuple[Any, Any]:
    """(model, processor) of LLaVA-1.5-7B shape with random weights, created directly on `device`.

    `llm` replaces the LLM's widths and depth (e.g. a 2-layer stub where only the vision side is measured).
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from models.builtin.tokenizer import CHAT_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer()
    vision = _shrink(
        {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
        smoke,
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2},
    )
    text = _shrink(
        {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
        },
        smoke,
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        },
    )
    text = {**text, **(llm or {})}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **vision),
        text_config=LlamaConfig(
            vocab_size=32064,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_mean=list(OPENAI_CLIP_MEAN),
            image_std=list(OPENAI_CLIP_STD),
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def build_qwen2_5_vl_7b(device: torch.device, dtype: torch.dtype, smoke: bool = False) -> tuple[Any, Any]:
    """(model, processor) of Qwen2.5-VL-7B shape with random weights, created directly on `device`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from models.qwen2_5_vl import Qwen2_5_VLImageOnlyProcessor

    tokenizer = _qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    text = _shrink(
        {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
        },
        smoke,
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    )
    head_dim = text["hidden_size"] // text["num_attention_heads"]  # 128 (full size), 16 (smoke)
    section = [16, 24, 24] if head_dim == 128 else [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
    vision = _shrink(
        {
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        smoke,
        {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "fullatt_block_indexes": [1],
        },
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 152064,
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": section},
            "eos_token_id": ids["<|im_end|>"],
            "bos_token_id": None,
            "pad_token_id": ids["<|endoftext|>"],
            **text,
        },
        vision_config={
            "out_hidden_size": text["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            **vision,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    side = QWEN_IMAGE_SIDE
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=56 * 56,
        max_pixels=side * side,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    processor = Qwen2_5_VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def qwen3_vl_8b_config(ids: dict[str, int], smoke: bool = False) -> Any:
    """The `Qwen3VLConfig` of Qwen3-VL-8B-Instruct (published values, see the module docstring), or its smoke twin."""
    from transformers import Qwen3VLConfig

    text = _shrink(
        {
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
        },
        smoke,
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        },
    )
    section = [24, 20, 20] if text["head_dim"] == 128 else [2, 3, 3]
    vision = _shrink(
        {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16},
        smoke,
        {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2},
    )
    return Qwen3VLConfig(
        text_config={
            "vocab_size": 151936,
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": section,
                "mrope_interleaved": True,
            },
            "eos_token_id": ids["<|im_end|>"],
            "bos_token_id": None,
            "pad_token_id": ids["<|endoftext|>"],
            **text,
        },
        vision_config={
            "out_hidden_size": text["hidden_size"],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24] if not smoke else [0, 1, 2],
            "hidden_act": "gelu_pytorch_tanh",
            **vision,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_qwen3_vl_8b(device: torch.device, dtype: torch.dtype, smoke: bool = False) -> tuple[Any, Any]:
    """(model, processor) of Qwen3-VL-8B shape with random weights, created directly on `device`."""
    from transformers import Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from models.qwen3_vl import Qwen3VLImageOnlyProcessor

    tokenizer = _qwen_tokenizer()
    config = qwen3_vl_8b_config(
        {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}, smoke
    )
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype).eval()
    side = QWEN3_IMAGE_SIDE
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=64 * 64,
        max_pixels=side * side,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Qwen3VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def build_shape(name: str, device: torch.device, smoke: bool = False) -> Any:
    """A `ModelRunner` over a random-weight model of shape `name` (bf16 on CUDA, float32 on CPU)."""
    from models.runner import ModelRunner

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "llava_1_5_7b":
        from models.llava import LlavaAdapter

        model, processor = build_llava_1_5_7b(device, dtype, smoke)
        adapter: Any = LlavaAdapter(model, processor)
    elif name == "qwen2_5_vl_7b":
        from models.qwen2_5_vl import Qwen2_5_VLAdapter

        model, processor = build_qwen2_5_vl_7b(device, dtype, smoke)
        adapter = Qwen2_5_VLAdapter(model, processor)
    elif name == "qwen3_vl_8b":
        from models.qwen3_vl import Qwen3VLAdapter

        model, processor = build_qwen3_vl_8b(device, dtype, smoke)
        adapter = Qwen3VLAdapter(model, processor)
    else:
        raise ValueError(f"unknown shape {name!r}; expected one of {SHAPES}")
    params = sum(p.numel() for p in model.parameters())
    logger.info(
        "built %s%s: %.2f B parameters on %s", name, " (smoke)" if smoke else "", params / 1e9, device
    )
    return ModelRunner(adapter, name=name + ("-smoke" if smoke else ""))


__all__ = [
    "QWEN3_IMAGE_SIDE",
    "QWEN_IMAGE_SIDE",
    "SHAPES",
    "build_llava_1_5_7b",
    "build_qwen2_5_vl_7b",
    "build_qwen3_vl_8b",
    "build_shape",
    "qwen3_vl_8b_config",
]

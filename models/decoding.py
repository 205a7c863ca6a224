"""Greedy decoding over the pruned sequence: the engine's own loop, with or without a KV cache.

Why not `model.generate()`: after an LLM-side drop the layers after the drop have a shorter KV cache than the
layers before it, and every sample of a padded batch kept a different number of tokens, so the stage-2 controller
must see every step (`models/stage2.py`). Owning the loop also lets the prefill and the decode be timed apart.
Positions continue from the prompt's last ORIGINAL position id (not the pruned length), so decoding sees the same
positions the unpruned model would. Cached steps of a Llama-style language model (LLaVA, Qwen2.5-VL, dense
Qwen3-VL) go through `models.fast_decode` (the same arithmetic without the model stack's per-step Python); other
models step through their own forward.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import DynamicCache

from models.fast_decode import KVBuffers

if TYPE_CHECKING:
    from models.clocks import Clock
    from models.engine import LLMInputs, VisionLanguageAdapter
    from models.tasks import VisualTokenReport

FinishReason = Literal["stop", "length", "cancelled"]
"""Why a sample stopped: its EOS, its token cap, or its caller gave up on it (a client that left)."""


def decode_step(model: torch.nn.Module, llm: LLMInputs, generated: torch.Tensor, cache: DynamicCache) -> Any:
    """One cached step: feed the newest token of `generated` after the prompt and the tokens before it.

    Args:
        model: The transformers model (its decoder layers carry the stage-2 controller's hooks).
        llm: The stage-1 sequence the prefill ran on.
        generated: `torch.LongTensor` of shape `(B, T)`, every token generated so far.
        cache: The KV cache the prefill filled.
    """
    mask = torch.cat([llm.attention_mask, torch.ones_like(generated)], dim=1)
    position = llm.position_ids[..., -1:] + generated.shape[1]
    return model(
        input_ids=generated[:, -1:],
        attention_mask=mask,
        position_ids=position,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )


def greedy_decode(
    adapter: VisionLanguageAdapter,
    llm: LLMInputs,
    limits: Sequence[int],
    clock: Clock,
    use_cache: bool = True,
    stop_at_eos: bool = True,
    cancelled: Callable[[], Collection[int]] | None = None,
    on_step: Callable[[Sequence[Sequence[int]]], None] | None = None,
) -> tuple[list[list[int]], list[VisualTokenReport], list[FinishReason]]:
    """Greedy tokens per sample (up to and including EOS, at most `limits[b]`), the prefill's reports, and why
    each sample stopped.

    Without a cache every step re-runs the whole pruned prefill with the generated tokens appended (the reference
    the cached path is tested against). With `stop_at_eos=False` every sample decodes exactly `max(limits)`
    tokens (the speed benchmark: every configuration decodes the same amount). The clock records "prefill" and,
    when more than one token is generated, "decode".

    Args:
        adapter: The engine whose model runs.
        llm: The stage-1 sequence.
        limits: Generation cap per sample.
        clock: Stage clock.
        use_cache: Decode with a KV cache.
        stop_at_eos: Stop a sample at its EOS (False: decode `max(limits)` tokens for every sample).
        cancelled: Called before every step; samples it names stop at once (finish reason "cancelled"), and the
            loop ends early when nothing is left to decode.
        on_step: Called after every step with each sample's tokens so far (streaming); finished samples' lists
            stop growing.
    """
    # The prefill's time includes making its KV cache (0.3 ms for a DynamicCache on the built-in model).
    start = clock.now()
    batch_size = llm.input_ids.shape[0]
    eos_ids = eos_token_ids(adapter.model, adapter.processor) if stop_at_eos else set()
    generated = torch.zeros(batch_size, 0, dtype=torch.long, device=llm.input_ids.device)
    finished = [False] * batch_size
    reasons: list[FinishReason] = ["length"] * batch_size
    sequences: list[list[int]] = [[] for _ in range(batch_size)]
    reports: list[VisualTokenReport] = []
    cache = DynamicCache(config=adapter.model.config.text_config) if use_cache else None
    controller = adapter.controller
    fast_step = adapter.fast_decode_step if cache is not None else None
    buffers: KVBuffers | None = None  # the fast step's KV cache, made from the prefill's on the first step
    try:
        for step in range(max(limits)):
            if cancelled is not None and step > 0:
                for b in cancelled():
                    if 0 <= b < batch_size and not finished[b]:
                        finished[b], reasons[b] = True, "cancelled"
                if all(finished):
                    break
            if cache is None or step == 0:
                logits = adapter.run_llm(llm, trailing=generated, cache=cache, logits_to_keep=1).logits[:, -1]
                if step == 0:
                    reports = adapter.reports(llm)
                    start = clock.add("prefill", start)
                    if cache is not None:
                        controller.end_prefill()
                if cache is None:
                    controller.finish()
            elif fast_step is not None:
                if buffers is None:
                    buffers = KVBuffers(cache, extra=max(limits) - step)
                logits = fast_step(llm, generated, buffers, controller.decode_key_valid)
            else:
                logits = decode_step(adapter.model, llm, generated, cache).logits[:, -1]
            next_tokens = logits.argmax(dim=-1)
            generated = torch.cat([generated, next_tokens[:, None]], dim=1)
            for b, token in enumerate(next_tokens.tolist()):
                if finished[b]:
                    continue
                sequences[b].append(token)
                if token in eos_ids:
                    finished[b], reasons[b] = True, "stop"
                elif stop_at_eos and len(sequences[b]) >= limits[b]:
                    finished[b] = True
            if on_step is not None:
                on_step(sequences)
            if all(finished):
                break
    finally:
        controller.finish()
    if generated.shape[1] > 1:
        clock.add("decode", start)
    return sequences, reports, reasons


def pad_token_id(processor: Any) -> int:
    """The tokenizer's pad id (its EOS id when it has no pad token)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def eos_token_ids(model: torch.nn.Module, processor: Any) -> set[int]:
    """Every id that ends an answer: the generation config's, the text config's and the tokenizer's EOS."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config.text_config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


__all__ = ["FinishReason", "decode_step", "eos_token_ids", "greedy_decode", "pad_token_id"]

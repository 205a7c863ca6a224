"""The training loop of one curriculum stage: optimiser and schedule, one step, periodic evaluation and saving."""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from models.builtin.build import TINY_OVERRIDES, build_builtin
from models.builtin.data import (
    Example,
    SceneBatches,
    make_loader,
    official_eval_examples,
    stage_eval_examples,
)
from models.builtin.train.checkpoint import (
    CHECKPOINT,
    STATE_FILE,
    append_metrics,
    load_model_dir,
    save_checkpoint,
)
from models.builtin.train.evaluation import evaluate
from models.builtin.train.heads import (
    AttentionTargetLoss,
    PatchHead,
    PhraseHead,
    image_token_spread,
    rescale_image_tokens,
)
from models.builtin.train.losses import answer_loss
from models.builtin.train.precision import autocast_for
from models.loading import resolve_device

logger = logging.getLogger(__name__)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, as `generate()` derives them, so padding side never matters."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def training_step(
    model: LlavaForConditionalGeneration,
    batch: dict[str, torch.Tensor],
    args: argparse.Namespace,
    loc_offset: int,
    patch_head: PatchHead | None = None,
    attention_loss: AttentionTargetLoss | None = None,
    phrase_head: PhraseHead | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward one collated batch (already on the model's device) and return the loss."""
    with autocast_for(batch["input_ids"].device, args.precision):
        outputs = model.model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            position_ids=position_ids_from_mask(batch["attention_mask"]),
            use_cache=False,
            output_hidden_states=phrase_head is not None,
        )
        loss, stats = answer_loss(
            outputs.last_hidden_state,
            batch["labels"],
            model.lm_head,
            loc_offset,
            args.loc_sigma,
            args.loc_soft_weight,
            args.example_weighting,
        )
    num_images = batch["pixel_values"].shape[0]
    stats["answer_loss"] = loss.item()
    if patch_head is not None and args.aux_weight > 0:
        aux = patch_head.loss(outputs.image_hidden_states, batch["patch_targets"], args.aux_object_weight)
        stats["aux_loss"] = aux.item()
        loss = loss + args.aux_weight * aux
    if phrase_head is not None:
        phrase, phrase_acc = phrase_head.loss(
            outputs.hidden_states, batch["labels"], batch["prompt_attributes"]
        )
        stats["phrase_loss"], stats["phrase_acc"] = phrase.item(), phrase_acc
        loss = loss + args.phrase_weight * phrase
    if attention_loss is not None and args.attn_weight > 0:
        with autocast_for(batch["input_ids"].device, args.precision):
            targets = batch["attention_targets"] if args.attn_questions else batch["target_patches"]
            attn = attention_loss.loss(
                batch["input_ids"], batch["labels"], targets, model.config.image_token_id
            )
        if attn is not None:
            stats["attn_loss"] = attn.item()
            loss = loss + args.attn_weight * attn
    stats["image_token_spread"] = image_token_spread(outputs.image_hidden_states, num_images)
    return loss, stats


def _param_groups(
    model: torch.nn.Module, lr: float, weight_decay: float, vision_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW groups: (vision or language) x (decayed matrices or undecayed norms/biases/embeddings)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_vision = "vision_tower" in name or "multi_modal_projector" in name
        decays = not (param.ndim < 2 or "embed" in name or "norm" in name)
        groups[is_vision, decays].append(param)
    return [
        {
            "params": params,
            "lr": lr * (vision_lr_scale if is_vision else 1.0),
            "weight_decay": weight_decay if decays else 0.0,
        }
        for (is_vision, decays), params in sorted(groups.items())
    ]


def _lr_lambda(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) one stage; returns the last evaluation record."""
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    state: dict[str, Any] | None = None
    if args.resume:
        if not (args.out / STATE_FILE).exists():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {args.out}")
        state = torch.load(args.out / STATE_FILE, map_location="cpu", weights_only=False)
        if state["stage"] != args.stage:
            raise ValueError(f"--resume: {args.out} holds stage {state['stage']!r}, not {args.stage!r}")
        source: Path | None = args.out / CHECKPOINT
    else:
        source = load_model_dir(args.init) if args.init else None
    if source is None:
        model, processor = build_builtin(None, TINY_OVERRIDES if args.tiny else None, seed=args.seed)
    else:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    model.to(device).train()
    loc_offset = int(processor.tokenizer.convert_tokens_to_ids("<loc_0>"))

    patch_head = PatchHead(model.config.text_config.hidden_size).to(device)
    attention_loss = None
    if args.attn_weight > 0:
        attention_loss = AttentionTargetLoss(model, args.attn_layers, args.attn_heads, args.attn_positions)
    phrase_head = None
    if args.phrase_weight > 0:
        layer = (
            model.config.text_config.num_hidden_layers // 2
            if args.phrase_layer is None
            else args.phrase_layer
        )
        phrase_head = PhraseHead(model.config.text_config.hidden_size, layer).to(device)
    param_groups = _param_groups(model, args.lr, args.weight_decay, args.vision_lr_scale)
    param_groups.append({"params": list(patch_head.parameters()), "lr": args.lr, "weight_decay": 0.0})
    if phrase_head is not None:
        param_groups.append({"params": list(phrase_head.parameters()), "lr": args.lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(
        param_groups,
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
        fused=False,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args.warmup, args.steps))
    step = 0
    if state is not None:
        patch_head.load_state_dict(state["patch_head"])
        if (phrase_head is None) != (state.get("phrase_head") is None):
            raise ValueError("--resume: --phrase-weight must stay on (or off) as it was in this run")
        if phrase_head is not None:
            phrase_head.load_state_dict(state["phrase_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        logger.info("resumed %s at step %d", args.out, step)

    if args.image_token_norm is not None and state is None:
        probe_batch = SceneBatches(processor.tokenizer, args.stage, 16, seed=args.seed).batch(10**6)
        before, after = rescale_image_tokens(
            model, {k: v.to(device) for k, v in probe_batch.items()}, args.image_token_norm
        )
        logger.info("visual-token mean norm %.2f -> %.2f", before, after)
    num_workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 1)
    dataset = SceneBatches(
        processor.tokenizer,
        args.stage,
        args.batch_size,
        seed=args.seed,
        start_batch=step,
        grounding_fraction=args.grounding_fraction,
        kind_weights=args.kind_weights,
    )
    batches = iter(make_loader(dataset, num_workers))
    eval_sets: dict[str, list[Example]] = {}
    if args.eval_items:
        if args.stage != "all":  # the "all" stage's own distribution is the official set
            eval_sets["stage"] = stage_eval_examples(args.stage, args.eval_items)
        eval_sets["all"] = official_eval_examples(max(1, args.eval_items // 2))

    def run_eval() -> dict[str, Any]:
        started = time.monotonic()
        record: dict[str, Any] = {"type": "eval", "step": step, "stage": args.stage}
        for name, examples in eval_sets.items():
            for key, value in evaluate(model, processor, examples, args.eval_batch_size).items():
                record[f"{name}/{key}"] = value
        record["eval_s"] = round(time.monotonic() - started, 1)
        append_metrics(args.out, record)
        logger.info("eval %s", json.dumps(record))
        return record

    last_eval: dict[str, Any] = {}
    window: dict[str, list[float]] = defaultdict(list)
    window_start, data_wait = time.monotonic(), 0.0
    progress = tqdm(
        total=args.steps,
        initial=step,
        desc=args.stage,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30,
    )
    last_step = args.steps if args.stop_at is None else min(args.steps, args.stop_at)
    while step < last_step:
        fetch_start = time.monotonic()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        data_wait += time.monotonic() - fetch_start
        loss, stats = training_step(model, batch, args, loc_offset, patch_head, attention_loss, phrase_head)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}")
        window["loss"].append(loss.item())
        window["grad_norm"].append(float(grad_norm))
        for key, value in stats.items():
            window[key].append(value)
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % args.log_every == 0 or step == last_step:
            elapsed = time.monotonic() - window_start
            record = {"type": "train", "step": step, "stage": args.stage, "lr": scheduler.get_last_lr()[0]}
            record.update({k: sum(v) / len(v) for k, v in window.items()})
            record["steps_per_s"] = len(window["loss"]) / elapsed
            record["data_wait_frac"] = data_wait / elapsed
            append_metrics(args.out, record)
            window.clear()
            window_start, data_wait = time.monotonic(), 0.0
        if step % args.eval_every == 0 or step == last_step:
            if eval_sets:
                last_eval = run_eval()
            save_checkpoint(
                args.out, model, processor, optimizer, scheduler, step, args, patch_head, phrase_head
            )
            window_start = time.monotonic()
    progress.close()
    return last_eval


__all__ = ["train", "training_step"]

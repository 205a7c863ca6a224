"""`python -m models.builtin.train`: the training command line (flags, their parsers) and its entry point."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from models.builtin import scenes
from models.builtin.data import STAGES
from models.builtin.train.loop import train


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the built-in tiny LLaVA on synthetic scenes.")
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--steps", required=True, type=int, help="total optimizer steps of this stage")
    parser.add_argument("--init", type=Path, help="start from this model dir (or run dir with checkpoint/)")
    parser.add_argument("--resume", action="store_true", help="continue DIR from its trainer_state.pt")
    parser.add_argument(
        "--stop-at", type=int, default=None, help="save and exit at this step (schedule still spans --steps)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    parser.add_argument(
        "--vision-lr-scale", type=float, default=1.0, help="LR multiplier of the vision tower and projector"
    )
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--grounding-fraction", type=float, default=0.6)
    parser.add_argument(
        "--kind-weights",
        type=_kind_weights,
        default={},
        help="stage all: relative weights of item kinds, e.g. 'vqa/count=2,ground/color_object=1.5' (others: 1)",
    )
    parser.add_argument("--aux-weight", type=float, default=0.5, help="weight of the PatchHead loss (0: off)")
    parser.add_argument(
        "--aux-object-weight",
        type=float,
        default=1.0,
        help="PatchHead weight of object patches relative to background ones (1: plain mean)",
    )
    parser.add_argument(
        "--attn-weight",
        type=float,
        default=0.0,
        help="weight of the AttentionTargetLoss (mid-LLM heads look at what the prompt names; 0: off)",
    )
    parser.add_argument(
        "--attn-layers",
        type=_int_list,
        default=None,
        help="comma-separated LLM layers the AttentionTargetLoss supervises (default: the middle one)",
    )
    parser.add_argument(
        "--attn-heads",
        type=_heads_list,
        default="0",
        help="comma-separated query heads the AttentionTargetLoss supervises in each layer, or 'all'",
    )
    parser.add_argument(
        "--attn-positions",
        type=int,
        default=1,
        help="answer positions per row the AttentionTargetLoss supervises (4: every location token of a box)",
    )
    parser.add_argument(
        "--attn-questions",
        action="store_true",
        help="also supervise questions, at the objects they name (data.attention_target_shares)",
    )
    parser.add_argument(
        "--phrase-weight",
        type=float,
        default=0.0,
        help="weight of the PhraseHead loss (the answer position must know what the prompt names; 0: off)",
    )
    parser.add_argument(
        "--phrase-layer", type=int, default=None, help="residual stream read by PhraseHead (default: middle)"
    )
    parser.add_argument(
        "--image-token-norm",
        type=float,
        default=None,
        help="at the start of a run (not on --resume), rescale the projector so visual tokens have this mean norm",
    )
    parser.add_argument("--loc-sigma", type=float, default=8.0, help="Gaussian width in location bins")
    parser.add_argument("--loc-soft-weight", type=float, default=0.5, help="share of the soft loc target")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-items", type=int, default=200, help="items per evaluation set")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU",
    )
    parser.add_argument(
        "--example-weighting",
        action="store_true",
        help="weigh examples equally in the answer loss (default: every answer token equally)",
    )
    parser.add_argument(
        "--num-workers", type=int, default=None, help="DataLoader workers (1 on CPU, 4 on CUDA)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="fresh model uses the test-sized config")
    return parser.parse_args(argv)


def _int_list(text: str) -> list[int]:
    """Parse "4,5,6" (argparse type of the --attn-* flags)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def _kind_weights(text: str) -> dict[str, float]:
    """Parse "vqa/count=2,ground/extremal=1.5" for ``--kind-weights`` (kinds of `scenes`, weights > 0)."""
    known = {f"ground/{k}" for k in scenes.PHRASE_KINDS} | {f"vqa/{k}" for k in scenes.QUESTION_KINDS}
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        if not sep or kind.strip() not in known:
            raise argparse.ArgumentTypeError(
                f"expected KIND=WEIGHT with KIND in {sorted(known)}, got {part!r}"
            )
        try:
            weight = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {kind!r} is not a number: {value!r}") from None
        if not weight > 0:
            raise argparse.ArgumentTypeError(f"weight of {kind!r} must be > 0, got {weight}")
        weights[kind.strip()] = weight
    return weights


def _heads_list(text: str) -> list[int] | None:
    """Parse "0,2" or "all" (None: every head) for ``--attn-heads``."""
    return None if text.strip() == "all" else _int_list(text)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(parse_args(argv))


__all__ = ["main", "parse_args"]

"""Mixed precision for training and its evaluation: `--precision` as an autocast context."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch


def autocast_for(device: torch.device, precision: str = "auto") -> Any:
    """The autocast context of `--precision` on `device` (a no-op for fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


__all__ = ["autocast_for"]

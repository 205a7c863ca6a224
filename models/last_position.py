"""The prefill's last decoder layer runs its attention output projection and MLP only where logits are read.

Why: a serving prefill keeps the logits of one position per sample (`logits_to_keep=1`), so the last decoder
layer's output is read at that position only (the final norm is per row, and the LM head runs on the last
position). The stock layer still runs `o_proj` and the MLP for every position: on the built-in model that is 78%
of the last layer's matrix products, about a tenth of the whole prefill's. Every position's keys and values are
still needed (they fill the KV cache), so q/k/v and the attention run as stock; only `o_proj` and the MLP run on
the last `rows_per_sample(B)` positions of each sample, and their output is put back into a zero tensor of the
full shape. The rows nobody reads then hold the residual alone.

Why it is exact, not close: a row of a matrix product depends only on that input row as long as the BLAS runs the
same kernel for it. Measured with MKL on the Xeon of earlier sessions: a product over any subset of at least 4 rows
gives the full product's rows to the last bit; over 1-3 rows it does not (a small-M path, up to 3e-5 apart). So at
least `min_rows` rows always run, `min_rows` being what a seeded random probe of the layer's own weights at
start-up (`LastPositionRows.probe_min_rows`) found exact in the layout the prefill uses, and nothing is armed when
no row count passes (a BLAS that picks its kernel by the row count, as GPU libraries may). Which way it goes
depends on the CPU: on an AVX-512 / AMX Xeon, with the same torch wheel, products over up to 175 rows of a
1024-wide input differ from the full product's rows, so there the probe refuses and the whole layer runs. The other
arithmetic of the layer (residual adds, RMSNorm, the MLP's activation and product) is per row.

Used only with the fast decode step's model families (Llama-style text models with sdpa: LLaVA, Qwen2.5-VL and
dense Qwen3-VL, `models.fast_decode.LLAMA_STYLE`) and with
`NUWA_FAST_PATHS` on; armed by `VisionLanguageAdapter.run_llm` around a prefill with `logits_to_keep=1`, nowhere
else (decode steps, and the full forward of `forward`, run stock).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PROBE_BATCHES = ((1, 96), (2, 41), (3, 29), (5, 23), (8, 37), (16, 12))
"""(batch, positions) layouts of the start-up probe; together they try every row count up to `PROBE_ROWS`."""
PROBE_ROWS = 64
"""Row counts probed: 1 to this many (a larger batch runs one position per sample, a product of its own size)."""
PROBE_MAX_ROWS = 8
"""The largest `min_rows` worth having: beyond it the saving shrinks and nothing is armed."""


class LastPositionRows:
    """Forward hooks on the last decoder layer's `o_proj` and `mlp`, inactive until `only_last` arms them.

    Args:
        o_proj: The last layer's attention output projection (an `nn.Linear`).
        mlp: The last layer's MLP (`gate_proj`, `up_proj`, `down_proj`, each an `nn.Linear`).
        min_rows: The fewest rows a product may run on and still equal the full product's rows.
    """

    def __init__(self, o_proj: nn.Linear, mlp: nn.Module, min_rows: int) -> None:
        self.min_rows = min_rows
        self._keep: int | None = None  # positions per sample while armed, None otherwise
        # The full length each hooked module saw: its pre-hook pushes, its forward hook pops.
        self._positions: list[int] = []
        self.armed_runs = 0
        """How many prefills ran with the hooks armed (for tests and profiling)."""
        for module in (o_proj, mlp):
            module.register_forward_pre_hook(self._narrow)
            module.register_forward_hook(self._widen)

    @classmethod
    def for_layer(cls, layer: nn.Module) -> LastPositionRows | None:
        """The hooks for a Llama-style decoder layer whose products pass the probe, else None."""
        o_proj = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        mlp = getattr(layer, "mlp", None)
        linears = [o_proj] + [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(type(module) is nn.Linear for module in linears):
            return None
        min_rows = cls.probe_min_rows(linears)  # type: ignore[arg-type]
        if min_rows is None:
            return None
        return cls(o_proj, mlp, min_rows)  # type: ignore[arg-type]

    @staticmethod
    @torch.inference_mode()
    def probe_min_rows(linears: list[nn.Linear], seed: int = 0) -> int | None:
        """The smallest row count from which a product over the last positions of each sample equals those rows of
        the full product, for every probe layout and every linear (None: not even `PROBE_MAX_ROWS` is)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        smallest_exact = 1
        for linear in linears:
            weight = linear.weight
            for batch, positions in PROBE_BATCHES:
                states = torch.randn(
                    batch, positions, weight.shape[1], generator=generator, dtype=torch.float32
                )
                states = states.to(device=weight.device, dtype=weight.dtype)
                full = F.linear(states, weight, linear.bias)
                for keep in range(1, min(positions, PROBE_ROWS // batch) + 1):
                    rows = batch * keep
                    if rows < smallest_exact:
                        continue
                    part = F.linear(states[:, -keep:].contiguous(), weight, linear.bias)
                    if not torch.equal(part, full[:, -keep:]):
                        smallest_exact = rows + 1
        return smallest_exact if smallest_exact <= PROBE_MAX_ROWS else None

    def rows_per_sample(self, batch: int) -> int:
        """Positions per sample that run: enough that the batch runs at least `min_rows` rows."""
        return max(1, math.ceil(self.min_rows / batch))

    def covers(self, batch: int) -> bool:
        """Whether the probe tried the row count a batch of this size would run (at most `PROBE_ROWS` rows).

        A larger batch (`NUWA_MAX_BATCH_SIZE` has no upper bound) runs the whole layer: exactness was measured
        only up to `PROBE_ROWS`, and on some CPUs a product over a larger subset differs again (an AVX-512 Xeon
        gave inexact rows up to 175 of 1024-wide inputs).
        """
        return batch * self.rows_per_sample(batch) <= PROBE_ROWS

    @contextlib.contextmanager
    def only_last(self, batch: int) -> Iterator[None]:
        """Within: the hooked modules compute the last `rows_per_sample(batch)` positions of each sample only
        (nothing changes for a batch the probe does not cover)."""
        if not self.covers(batch):
            yield
            return
        self._keep = self.rows_per_sample(batch)
        self.armed_runs += 1
        try:
            yield
        finally:
            self._keep = None
            self._positions.clear()

    # ---- hooks -------------------------------------------------------------------------------------------------
    def _narrow(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        keep = self._keep
        if keep is None:
            return None
        states = args[0]
        positions = states.shape[1]
        if positions <= keep:  # nothing to skip (a short sequence): run as stock, widen nothing
            self._positions.append(-1)
            return None
        self._positions.append(positions)
        return (states[:, -keep:].contiguous(), *args[1:])

    def _widen(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if self._keep is None:
            return None
        positions = self._positions.pop()
        if positions < 0:
            return None
        full = output.new_zeros(output.shape[0], positions, output.shape[2])
        full[:, -output.shape[1] :] = output
        return full


__all__ = ["LastPositionRows"]

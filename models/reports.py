"""What pruning did to each sample, as measured: the `VisualTokenReport` of every response, and prefill FLOPs.

The counts come from the run itself (the stage-2 controller counts the visual tokens each decoder layer really
saw), not from the plan, so a report can never claim a budget the engine did not apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from models.budget import PruningConfig
from models.plans import rule_label
from models.tasks import VisualTokenReport

if TYPE_CHECKING:
    from models.engine import LLMInputs
    from models.stage2 import LayerDropController


def prefill_flops(sequence_lengths: Sequence[int], hidden: int, intermediate: int) -> float:
    """Theoretical prefill FLOPs: sum over layers of 8*S*H^2 + 4*S^2*H + 4*S*H*I (the Nüwa paper's count)."""
    return float(
        sum(8 * s * hidden**2 + 4 * s * s * hidden + 4 * s * hidden * intermediate for s in sequence_lengths)
    )


def visual_token_reports(
    controller: LayerDropController, llm: LLMInputs, configs: Sequence[PruningConfig], text_config: Any
) -> list[VisualTokenReport]:
    """One report per sample of the prefill that just ran under `controller`.

    Args:
        controller: The stage-2 controller of the run (per-layer visual counts, rows kept to the last layer).
        llm: The stage-1 inputs of the run (each sample's plan, grid and kept grid indices).
        configs: The pruning config of each sample.
        text_config: The LLM's config (`hidden_size`, `intermediate_size` for the FLOPs count).
    """
    counts = controller.visual_counts  # per layer, per sample
    kept_rows = controller.kept_visual()  # per sample, rows of the stage-1 sequence
    hidden = int(text_config.hidden_size)
    intermediate = int(text_config.intermediate_size)
    reports = []
    for b, (sample, config) in enumerate(zip(llm.samples, configs, strict=True)):
        per_layer = tuple(int(layer_counts[b]) for layer_counts in counts)
        cols = sample.grid[1]
        # Python ints before the per-token loops: indexing a tensor element by element cost ~1.5 ms per sample
        visual_rows = torch.nonzero(llm.visual[b]).flatten().tolist()
        order = {row: i for i, row in enumerate(visual_rows)}
        source = sample.source_index.tolist()
        final = [source[order[row]] for row in kept_rows[b].tolist()]
        text = llm.text_tokens[b]
        reports.append(
            VisualTokenReport(
                method=config.method,
                budget=config.budget,
                original=sample.plan.num_tokens,
                stage1=sample.plan.stage1_tokens,
                stage2=per_layer[-1],
                per_layer=per_layer,
                average=sum(per_layer) / len(per_layer),
                grid=sample.grid,
                kept=tuple(divmod(index, cols) for index in sorted(final)),
                kept_stage1=tuple(divmod(index, cols) for index in sorted(source)),
                flops_prefill=prefill_flops([text + c for c in per_layer], hidden, intermediate),
                flops_prefill_unpruned=prefill_flops(
                    [text + sample.plan.num_tokens] * len(per_layer), hidden, intermediate
                ),
                plan=rule_label(config),
            )
        )
    return reports


__all__ = ["prefill_flops", "visual_token_reports"]

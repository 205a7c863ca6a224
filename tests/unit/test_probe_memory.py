"""Peak extra memory of the salience probes and of the aggregation, counted allocation by allocation (torch profiler, CPU allocator).

The Qwen2.5-VL column sum once built float32 logits and softmax for all heads at once (H x chunk x L), so one
12.8 MP image needed several GB. It must not grow with the number of heads, and with a fixed chunk at most
linearly with the patch count.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from models import pruning
from models.attention import ColumnSumProbe, QueryRowProbe
from models.pruning import aggregate, proximity_radius

torch.set_num_threads(1)


def peak_allocated_bytes(function) -> int:
    """Highest sum of live bytes allocated by `function` (its own allocations only), from the profiler's events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _column_sum_peak(heads: int, patches: int, chunk: int | None = None, buffer: int = 1 << 20) -> int:
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, patches, 32, generator=gen)
    key = torch.randn(1, heads, patches, 32, generator=gen)
    probe = ColumnSumProbe(chunk=chunk, buffer_elements=buffer)
    return peak_allocated_bytes(lambda: probe.observe(torch.nn.Identity(), query, key, 32**-0.5))


def test_column_sum_peak_does_not_grow_with_heads() -> None:
    two, sixteen = _column_sum_peak(2, 2048), _column_sum_peak(16, 2048)
    assert sixteen <= two * 1.05 + 4096
    # And it is about one (chunk x L) float32 buffer, nowhere near H x chunk x L.
    rows = ColumnSumProbe(buffer_elements=1 << 20).rows_per_chunk(2048)
    assert sixteen <= 1.1 * rows * 2048 * 4 + 65536


def test_column_sum_peak_is_bounded_then_linear_in_patches() -> None:
    # Adaptive chunk: constant while buffer / L >= min_chunk rows (here up to 16384 patches).
    small, large = _column_sum_peak(2, 2048), _column_sum_peak(2, 8192)
    assert large <= small * 1.5
    # Fixed chunk: linear in L (4x the patches, at most ~4x the memory), never quadratic (16x).
    fixed_small, fixed_large = _column_sum_peak(2, 1024, chunk=64), _column_sum_peak(2, 4096, chunk=64)
    assert fixed_large <= 4.5 * fixed_small


def test_query_row_probe_does_not_repeat_grouped_key_heads() -> None:
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, length, dim = 32, 4, 4096, 64
    query = torch.randn(1, heads, length, dim, generator=gen)
    key = torch.randn(1, kv_heads, length, dim, generator=gen)
    probe = QueryRowProbe(query_index={0: [length - 1]}, armed=True)
    peak = peak_allocated_bytes(lambda: probe.observe(torch.nn.Identity(), query, key, dim**-0.5))
    repeated_keys = heads * length * dim * 4
    assert peak < repeated_keys / 4
    # Still the attention row: grouped query head h reads key head h // 8.
    expected = torch.softmax(
        query[0, :, -1:] @ key[0].repeat_interleave(8, 0).transpose(-1, -2) * dim**-0.5, -1
    )
    torch.testing.assert_close(probe.rows[0], expected, atol=1e-6, rtol=0)


def _aggregation_case(grid: tuple[int, int], kept_every: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    num_tokens = grid[0] * grid[1]
    features = torch.randn(num_tokens, 16, generator=gen)
    similarity = torch.randn(num_tokens, 8, generator=gen)
    salience = torch.rand(num_tokens, generator=gen)
    kept = torch.arange(0, num_tokens, kept_every)
    return features, similarity, salience, kept


@pytest.mark.parametrize("convex_rows", [False, True])
def test_aggregation_in_row_chunks_equals_one_pass(
    monkeypatch: pytest.MonkeyPatch, convex_rows: bool
) -> None:
    features, similarity, salience, kept = _aggregation_case((12, 10))
    radius = proximity_radius((12, 10), 280 / 1058)
    whole = aggregate(features, similarity, salience, kept, (12, 10), radius, convex_rows=convex_rows)
    monkeypatch.setattr(pruning, "AGGREGATE_BUFFER_ELEMENTS", 7 * 120)  # 7 rows per chunk
    chunked = aggregate(features, similarity, salience, kept, (12, 10), radius, convex_rows=convex_rows)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    assert not torch.equal(whole, features[kept])  # something was mended


def test_aggregation_peak_is_bounded_by_the_chunk_not_kept_x_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = (64, 64)  # N = 4096, K = 2048: one pass would hold several K x N = 32 MiB temporaries
    features, similarity, salience, kept = _aggregation_case(grid)
    radius = proximity_radius(grid, 280 / 1058)
    one_pass = peak_allocated_bytes(lambda: aggregate(features, similarity, salience, kept, grid, radius))
    monkeypatch.setattr(pruning, "AGGREGATE_BUFFER_ELEMENTS", 1 << 20)  # 256 rows per chunk
    peak = peak_allocated_bytes(lambda: aggregate(features, similarity, salience, kept, grid, radius))
    rows = (1 << 20) // 4096
    assert peak <= 3 * rows * 4096 * 4 + 4 * 4096 * 16 * 4
    assert peak * 4 < one_pass

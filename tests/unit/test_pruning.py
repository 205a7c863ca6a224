"""Tests for models/pruning.py: exact values on small tensors against naive reference computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.pruning import (
    aggregate,
    attention_column_sum,
    attention_row,
    distinctness,
    pool_grid,
    proximity_radius,
    region_candidates,
    select_random,
    select_stage1,
    select_topk,
    visionzip_merge,
)

torch.set_num_threads(1)


def _naive_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """(H, Q, Lk) softmax with explicit per-head loops over the matching key head."""
    num_heads, num_kv_heads = query.shape[0], key.shape[0]
    group = num_heads // num_kv_heads
    rows = []
    for head in range(num_heads):
        logits = (query[head].double() @ key[head // group].double().T) * scaling
        rows.append(torch.softmax(logits, dim=-1))
    return torch.stack(rows)


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (4, 2), (6, 1)])
def test_attention_row_matches_naive_softmax(num_heads: int, num_kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(num_heads, 3, 8, generator=gen)
    key = torch.randn(num_kv_heads, 11, 8, generator=gen)
    got = attention_row(query, key, scaling=8**-0.5)
    assert got.dtype == torch.float32 and got.shape == (num_heads, 3, 11)
    torch.testing.assert_close(got.double(), _naive_attention(query, key, 8**-0.5), atol=1e-6, rtol=1e-5)


def test_attention_row_with_key_mask() -> None:
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(4, 1, 8, generator=gen)
    key = torch.randn(2, 9, 8, generator=gen)
    mask = torch.tensor([True, False, True, True, False, True, True, True, False])
    got = attention_row(query, key, scaling=0.3, key_mask=mask)
    expected = torch.zeros(4, 1, 9, dtype=torch.float64)
    expected[..., mask] = _naive_attention(query, key[:, mask], 0.3)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    assert torch.all(got[..., ~mask] == 0)


def test_attention_row_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple"):
        attention_row(torch.randn(3, 1, 4), torch.randn(2, 5, 4), 1.0)
    with pytest.raises(ValueError, match="every key"):
        attention_row(
            torch.randn(2, 1, 4), torch.randn(2, 5, 4), 1.0, key_mask=torch.zeros(5, dtype=torch.bool)
        )


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(2, 2), (4, 1)])
def test_attention_column_sum_matches_naive(chunk: int, num_heads: int, num_kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(num_heads, 20, 8, generator=gen)
    key = torch.randn(num_kv_heads, 20, 8, generator=gen)
    expected = _naive_attention(query, key, 0.35).sum(dim=1).mean(dim=0)
    got = attention_column_sum(query, key, scaling=0.35, chunk=chunk)
    assert got.shape == (20,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    assert got.sum().item() == pytest.approx(20.0, rel=1e-5)  # each query row sums to 1


def test_attention_accepts_half_precision() -> None:
    query = torch.randn(2, 5, 4).to(torch.bfloat16)
    key = torch.randn(2, 5, 4).to(torch.bfloat16)
    assert attention_column_sum(query, key, 0.5).dtype == torch.float32
    assert attention_row(query, key, 0.5).dtype == torch.float32


# ---------------------------------------------------------------- stage 1 selection


def test_proximity_radius_matches_paper_on_llava_grid() -> None:
    assert proximity_radius((24, 24), 280 / 1058) == pytest.approx(math.sqrt(280))
    assert proximity_radius((1, 1), 0.5) == 0.0


def test_region_candidates_pick_top_n_per_region() -> None:
    # 4x4 grid, 2x2 regions; salience = index, so each region's best is its bottom-right token.
    salience = torch.arange(16.0)
    assert region_candidates(salience, (4, 4), 2, 1).tolist() == [5, 7, 13, 15]
    assert region_candidates(salience, (4, 4), 2, 2).tolist() == [4, 5, 6, 7, 12, 13, 14, 15]


def test_region_candidates_pad_odd_grids_without_selecting_padding() -> None:
    salience = torch.zeros(15)  # 3x5 grid -> 2x3 regions, partial ones on the bottom and right
    cands = region_candidates(salience, (3, 5), 2, 4)
    assert cands.tolist() == list(range(15))  # every real token, no padding index, no duplicates
    one = region_candidates(salience, (3, 5), 2, 1)
    # ties go to the lowest index inside each region
    assert one.tolist() == [0, 2, 4, 10, 12, 14]


def test_region_candidates_ties_break_to_lower_index() -> None:
    salience = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert region_candidates(salience, (2, 2), 2, 1).tolist() == [0]


def test_select_stage1_covers_every_region() -> None:
    # A hot spot in one corner: plain top-k would keep only the corner; regions spread the kept set.
    grid = (8, 8)
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    salience = (-(rows**2 + cols**2)).reshape(-1)
    kept = select_stage1(salience, grid, k1=16, top_n=1)
    regions = {(int(i) // 8 // 2, int(i) % 8 // 2) for i in kept}
    assert len(regions) == 16
    plain = select_topk(salience, 16)
    assert len({(int(i) // 8 // 2, int(i) % 8 // 2) for i in plain}) < 16


def test_select_stage1_respects_top_n() -> None:
    gen = torch.Generator().manual_seed(3)
    salience = torch.rand(64, generator=gen)
    kept = select_stage1(salience, (8, 8), k1=20, top_n=2)
    per_region: dict[tuple[int, int], int] = {}
    for index in kept.tolist():
        region = (index // 8 // 2, index % 8 // 2)
        per_region[region] = per_region.get(region, 0) + 1
    assert max(per_region.values()) <= 2
    # and the kept tokens are the best 20 of the per-region top-2 candidates
    cands = region_candidates(salience, (8, 8), 2, 2)
    best = cands[torch.sort(salience[cands], descending=True, stable=True).indices[:20]]
    assert kept.tolist() == sorted(best.tolist())


def test_select_stage1_fills_when_candidates_run_short() -> None:
    salience = torch.arange(16.0)
    kept = select_stage1(salience, (4, 4), k1=6, top_n=1)  # 4 candidates, 2 filled by salience
    assert kept.tolist() == [5, 7, 12, 13, 14, 15]


@settings(max_examples=60, deadline=None)
@given(
    grid=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    data=st.data(),
)
def test_select_stage1_returns_exactly_k1_sorted_unique(grid: tuple[int, int], data: st.DataObject) -> None:
    num_tokens = grid[0] * grid[1]
    k1 = data.draw(st.integers(1, num_tokens))
    top_n = data.draw(st.integers(1, 4))
    region_size = data.draw(st.integers(1, 3))
    seed = data.draw(st.integers(0, 1000))
    salience = torch.rand(num_tokens, generator=torch.Generator().manual_seed(seed))
    salience[::3] = 0.5  # plenty of ties
    kept = select_stage1(salience, grid, k1, top_n, region_size)
    assert kept.dtype == torch.int64
    assert kept.numel() == k1
    assert torch.equal(kept, torch.unique(kept))  # unique and sorted
    assert 0 <= int(kept.min()) and int(kept.max()) < num_tokens
    # deterministic: same input, same output (and a permuted copy of the dtype does not matter)
    assert torch.equal(kept, select_stage1(salience.to(torch.float64), grid, k1, top_n, region_size))


def test_select_stage1_rejects_impossible_k1() -> None:
    with pytest.raises(ValueError, match="between 1 and"):
        select_stage1(torch.rand(16), (4, 4), k1=17, top_n=1)


# ---------------------------------------------------------------- aggregation


def _aggregation_inputs(seed: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(36, 5, generator=gen)
    similarity = torch.randn(36, 7, generator=gen)
    salience = torch.rand(36, generator=gen)
    return features, similarity, salience


def test_aggregate_all_pillars_returns_features_unchanged() -> None:
    features, similarity, salience = _aggregation_inputs()
    kept = torch.tensor([0, 7, 14, 35])
    out = aggregate(features, similarity, salience, kept, (6, 6), radius=3.0, pillar_quantile=0.0)
    assert torch.equal(out, features[kept])


def _reference_row(
    features: torch.Tensor, similarity: torch.Tensor, index: int, grid_w: int, radius: float, convex: bool
) -> torch.Tensor:
    unit = similarity.double() / similarity.double().norm(dim=1, keepdim=True)
    weights = []
    for j in range(features.shape[0]):
        cos = max(0.0, float(unit[index] @ unit[j]))
        dist = math.hypot(index // grid_w - j // grid_w, index % grid_w - j % grid_w)
        weights.append(cos * (1 - min(1.0, dist / radius)))
    row = torch.tensor(weights, dtype=torch.float64)
    row = row / row.sum()
    if not convex:
        row[index] = 1.0
    return row @ features.double()


@pytest.mark.parametrize("convex", [False, True])
def test_aggregate_matches_reference_for_non_pillars(convex: bool) -> None:
    features, similarity, salience = _aggregation_inputs()
    kept = torch.tensor([2, 9, 20, 27, 33])
    out = aggregate(features, similarity, salience, kept, (6, 6), radius=2.5, convex_rows=convex)
    kept_salience = salience[kept]
    pillars = kept_salience >= torch.quantile(kept_salience, 0.55)
    assert pillars.any() and (~pillars).any()
    for row, index in enumerate(kept.tolist()):
        if pillars[row]:
            assert torch.equal(out[row], features[index])
        else:
            expected = _reference_row(features, similarity, index, 6, 2.5, convex)
            torch.testing.assert_close(out[row].double(), expected, atol=1e-5, rtol=1e-5)


def test_aggregate_ignores_tokens_outside_the_radius() -> None:
    # Identical similarity everywhere, so only proximity decides; features far away are huge.
    grid = (6, 6)
    features = torch.zeros(36, 2)
    features[35] = 1e6  # distance from token 0 is sqrt(50) > radius
    features[1] = torch.tensor([2.0, 0.0])  # a neighbour within the radius
    similarity = torch.ones(36, 3)
    salience = torch.ones(36)
    salience[0] = 0.0  # token 0 is the only non-pillar
    out = aggregate(
        features, similarity, salience, torch.tensor([0, 35]), grid, radius=2.0, pillar_quantile=0.5
    )
    assert out[0, 1].item() == 0.0 and out[0, 0].item() > 0.0
    assert torch.equal(out[1], features[35])


def test_aggregate_convex_rows_stay_within_the_hull() -> None:
    features, similarity, salience = _aggregation_inputs(5)
    kept = torch.tensor([1, 8, 15, 22, 29, 30])
    out = aggregate(
        features, similarity, salience, kept, (6, 6), radius=10.0, convex_rows=True, pillar_quantile=1.0
    )
    low, high = features.min(dim=0).values, features.max(dim=0).values
    assert torch.all(out >= low - 1e-5) and torch.all(out <= high + 1e-5)
    # non-convex (code default) rows add the neighbours on top of the token itself
    default = aggregate(features, similarity, salience, kept, (6, 6), radius=10.0, pillar_quantile=1.0)
    assert not torch.allclose(default, out)


def test_aggregate_pillars_by_scores() -> None:
    features, similarity, salience = _aggregation_inputs()
    kept = torch.tensor([0, 5, 10, 15, 20, 25, 30, 35])
    key_norm = torch.zeros(36)
    key_norm[torch.tensor([10, 30])] = 1.0  # top 25% of 8 kept = 2 pillars
    out = aggregate(features, similarity, salience, kept, (6, 6), radius=3.0, pillar_scores=key_norm)
    changed = [not torch.equal(out[i], features[k]) for i, k in enumerate(kept.tolist())]
    assert changed == [True, True, False, True, True, True, False, True]


def test_aggregate_keeps_dtype() -> None:
    features, similarity, salience = _aggregation_inputs()
    out = aggregate(
        features.to(torch.bfloat16), similarity, salience, torch.tensor([3, 4]), (6, 6), radius=2.0
    )
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5)


# ---------------------------------------------------------------- baselines


def test_select_topk_orders_and_ties() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    assert select_topk(scores, 2).tolist() == [1, 3]
    assert select_topk(torch.ones(5), 3).tolist() == [0, 1, 2]
    assert select_topk(scores, 0).numel() == 0


def test_select_random_is_seeded() -> None:
    first = select_random(100, 10, seed=7)
    assert torch.equal(first, select_random(100, 10, seed=7))
    assert not torch.equal(first, select_random(100, 10, seed=8))
    assert first.numel() == 10 and torch.equal(first, torch.unique(first))
    assert first.dtype == torch.int64


def test_pool_grid_2x2_on_4x4() -> None:
    features = torch.arange(32.0).reshape(16, 2)
    pooled, representative = pool_grid(features, (4, 4), (2, 2))
    grid = features.reshape(4, 4, 2)
    expected = torch.stack(
        [grid[r : r + 2, c : c + 2].reshape(4, 2).mean(dim=0) for r in (0, 2) for c in (0, 2)]
    )
    torch.testing.assert_close(pooled, expected)
    assert representative.tolist() == [0, 2, 8, 10]


def test_pool_grid_uneven() -> None:
    features = torch.arange(15.0)[:, None]
    pooled, representative = pool_grid(features, (3, 5), (1, 2))
    # adaptive bins over columns: [0, 3) and [2, 5)
    image = features.view(3, 5)
    assert pooled[:, 0].tolist() == pytest.approx([image[:, :3].mean().item(), image[:, 2:].mean().item()])
    assert representative.tolist() == [1 * 5 + 1, 1 * 5 + 3]


def test_visionzip_merge() -> None:
    gen = torch.Generator().manual_seed(6)
    features = torch.randn(64, 4, generator=gen)
    keys = torch.randn(64, 6, generator=gen)
    salience = torch.rand(64, generator=gen)
    merged, source = visionzip_merge(features, keys, salience, k_total=16, contextual_fraction=10 / 64)
    num_ctx = round(16 * 10 / 64)
    assert merged.shape == (16, 4) and source.shape == (16,)
    dominant = source[: 16 - num_ctx]
    assert dominant.tolist() == sorted(select_topk(salience, 16 - num_ctx).tolist())
    assert torch.equal(merged[: 16 - num_ctx], features[dominant])
    # contextual tokens are averages of disjoint groups that together cover every non-dominant token
    rest = [i for i in range(64) if i not in set(dominant.tolist())]
    total_mass = features[rest].sum(dim=0)
    unit = torch.nn.functional.normalize(keys, dim=-1)
    targets = source[16 - num_ctx :]
    group = torch.argmax(unit[rest] @ unit[targets].T, dim=1)
    for g, target in enumerate(targets.tolist()):
        group[rest.index(target)] = g
    counts = torch.bincount(group, minlength=num_ctx).float()
    torch.testing.assert_close(
        (merged[16 - num_ctx :] * counts[:, None]).sum(dim=0), total_mass, atol=1e-4, rtol=1e-4
    )


def test_visionzip_merge_small_budgets() -> None:
    features = torch.randn(10, 3)
    salience = torch.arange(10.0)
    merged, source = visionzip_merge(features, features, salience, k_total=1, contextual_fraction=0.5)
    assert source.tolist() == [9] and torch.equal(merged[0], features[9])
    merged, source = visionzip_merge(features, features, salience, k_total=2, contextual_fraction=0.0)
    assert source[0].item() == 9 and merged.shape == (2, 3)  # one dominant + one contextual
    merged, source = visionzip_merge(features, features, salience, k_total=10, contextual_fraction=0.3)
    assert merged.shape == (10, 3) and sorted(source.tolist()) == list(range(10))


def test_distinctness_ranks_every_object_token_above_a_flat_background() -> None:
    torch.manual_seed(0)
    background = torch.tensor([1.0, 0.2, 0.1, 0.0])
    features = background + 0.01 * torch.randn(36, 4)
    objects = [3, 4, 17, 30]  # e.g. an object's interior, its edge, and two other objects
    features[3] = features[4] = torch.tensor([0.1, 1.0, 0.0, 0.3])
    features[17] = torch.tensor([0.0, 0.1, 1.0, 0.0])
    features[30] = torch.tensor([0.2, 0.0, 0.3, 1.0])
    scores = distinctness(features.half())
    assert scores.dtype == torch.float32 and scores.shape == (36,)
    assert sorted(torch.topk(scores, 4).indices.tolist()) == objects
    assert scores[3] == pytest.approx(scores[4].item())  # same feature, same score: no position bias
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 2.0
    assert torch.all(distinctness(background.expand(5, 4)) < 1e-6)  # a flat image: nothing stands out

"""Nüwa visual-token pruning maths on plain tensors, for ONE image at a time.

Why a separate, model-agnostic module: the model adapters (LLaVA, Qwen2.5-VL) only differ in where salience,
similarity features and the token grid come from; what to keep and how to mend the kept features is the same
maths. Keeping it here, with torch as the only dependency, lets it be tested exactly on small tensors.

Conventions:
* Tokens live on a (grid_h, grid_w) grid; an index is ``row * grid_w + col`` (raster order).
* Every selection is deterministic: ties go to the lower index (stable sorts), and nothing depends on the
  batch a sample arrives in, so a sample alone and inside a batch keeps exactly the same tokens.
* Scores and weights are computed in float32 whatever the input dtype; features come back in their own dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AGGREGATE_BUFFER_ELEMENTS = 1 << 24
"""Aggregation mends at most this many (row x token) float32 weights at a time (64 MiB per temporary)."""


def attention_row(query: Tensor, key: Tensor, scaling: float, key_mask: Tensor | None = None) -> Tensor:
    """Attention probabilities of a few query rows, e.g. the last prompt token over the sequence.

    Only these rows are needed to score tokens, so the layer itself keeps running SDPA/FlashAttention.

    Args:
        query: float tensor of shape `(num_heads, num_queries, head_dim)`.
        key: float tensor of shape `(num_kv_heads, num_keys, head_dim)`; `num_heads % num_kv_heads == 0`
            (grouped-query attention: query head h reads key head `h // (num_heads // num_kv_heads)`).
        scaling: multiplier of the logits, usually `head_dim ** -0.5`.
        key_mask: optional bool tensor of shape `(num_keys,)`, True where a key may be attended.

    Returns:
        float32 tensor of shape `(num_heads, num_queries, num_keys)`, each row summing to 1.
    """
    key = _repeat_kv(key, query.shape[0])
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if key_mask is not None:
        if key_mask.shape != (key.shape[1],):
            raise ValueError(f"key_mask has shape {tuple(key_mask.shape)}, expected ({key.shape[1]},)")
        if not bool(key_mask.any()):
            raise ValueError("key_mask masks every key; the attention row is undefined")
        logits = logits.masked_fill(~key_mask.to(device=logits.device, dtype=torch.bool), float("-inf"))
    return torch.softmax(logits, dim=-1)


def attention_column_sum(query: Tensor, key: Tensor, scaling: float, chunk: int = 1024) -> Tensor:
    """Attention each key receives from all queries (full, non-causal), mean over heads.

    This is the salience of encoders without a CLS token (Qwen2.5-VL's last full-attention vision block). Heads
    are processed one by one and queries `chunk` at a time, with the softmax done in place on the one logits
    buffer, so the extra memory is ONE `(chunk, num_keys)` float32 buffer plus one head's float32 key, whatever
    the number of heads (grouped key heads are read in place, never repeated).

    Args:
        query: float tensor of shape `(num_heads, num_queries, head_dim)`.
        key: float tensor of shape `(num_kv_heads, num_keys, head_dim)`; `num_heads % num_kv_heads == 0`.
        scaling: multiplier of the logits.
        chunk: queries per step.

    Returns:
        float32 tensor of shape `(num_keys,)`: sum over queries of the softmax, averaged over heads.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    num_heads, num_queries, _ = query.shape
    num_kv_heads = key.shape[0]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key heads ({num_kv_heads})")
    group = num_heads // num_kv_heads
    totals = torch.zeros(key.shape[1], dtype=torch.float32, device=query.device)
    for head in range(num_heads):
        head_key_t = key[head // group].float().transpose(0, 1)  # (d, Lk)
        for start in range(0, num_queries, chunk):
            probs = torch.matmul(query[head, start : start + chunk].float() * scaling, head_key_t)
            probs -= probs.amax(dim=-1, keepdim=True)
            probs.exp_()
            row_scale = probs.sum(dim=-1).reciprocal_()  # (chunk,): 1 / softmax denominator per query
            totals.addmv_(probs.transpose(0, 1), row_scale)  # sum over queries of exp / denominator
            del probs  # free this chunk's buffer before the next matmul allocates its own
    return totals / num_heads


def proximity_radius(grid: tuple[int, int], fraction: float) -> float:
    """Aggregation radius r in patches: r^2 = fraction * the largest squared distance on the grid.

    With the default fraction 280/1058 this is sqrt(280) on LLaVA's 24x24 grid, and it scales with the grid.
    """
    grid_h, grid_w = grid
    return math.sqrt(fraction * ((grid_h - 1) ** 2 + (grid_w - 1) ** 2))


def region_candidates(salience: Tensor, grid: tuple[int, int], region_size: int, top_n: int) -> Tensor:
    """Separation: tile the grid into `region_size` x `region_size` regions, take each region's top-n tokens.

    Odd grids are padded; padding is never selected, so a partial region offers at most its real tokens.

    Args:
        salience: tensor of shape `(N,)` with N = grid_h * grid_w, any float dtype.
        grid: (grid_h, grid_w).
        region_size: side of a region in tokens.
        top_n: candidates per region.

    Returns:
        int64 tensor of candidate indices in ascending (raster) order.
    """
    grid_h, grid_w = grid
    scores = _as_scores(salience, grid_h * grid_w)
    if region_size < 1 or top_n < 1:
        raise ValueError(f"region_size and top_n must be >= 1, got {region_size} and {top_n}")
    regions_h = math.ceil(grid_h / region_size)
    regions_w = math.ceil(grid_w / region_size)
    padded_h, padded_w = regions_h * region_size, regions_w * region_size
    device = scores.device

    index_grid = torch.full((padded_h, padded_w), -1, dtype=torch.long, device=device)
    index_grid[:grid_h, :grid_w] = torch.arange(grid_h * grid_w, device=device).view(grid_h, grid_w)
    score_grid = torch.full((padded_h, padded_w), float("-inf"), dtype=torch.float32, device=device)
    score_grid[:grid_h, :grid_w] = scores.view(grid_h, grid_w)

    def to_regions(values: Tensor) -> Tensor:  # (padded_h, padded_w) -> (num_regions, region_size ** 2)
        blocks = values.view(regions_h, region_size, regions_w, region_size).permute(0, 2, 1, 3)
        return blocks.reshape(regions_h * regions_w, region_size * region_size)

    region_index = to_regions(index_grid)
    region_score = to_regions(score_grid)
    # Within a region the flattened order is raster order, so a stable sort breaks ties by lower index.
    # Padding sorts last by a second stable sort on validity, even if real scores are -inf.
    order = torch.sort(region_score, dim=1, descending=True, stable=True).indices
    valid = torch.gather(region_index, 1, order) >= 0
    order = torch.gather(
        order, 1, torch.sort(valid.to(torch.int8), dim=1, descending=True, stable=True).indices
    )
    chosen = torch.gather(region_index, 1, order[:, : min(top_n, region_size * region_size)])
    chosen = chosen[chosen >= 0]
    return torch.sort(chosen).values


def select_stage1(
    salience: Tensor, grid: tuple[int, int], k1: int, top_n: int, region_size: int = 2
) -> Tensor:
    """Separation + alignment: keep exactly `k1` tokens spread over the whole image.

    Per-region top-n candidates are ranked globally by salience and the best `k1` kept; if the regions offer
    fewer than `k1` candidates, the rest is filled from the remaining tokens by salience.

    Args:
        salience: tensor of shape `(N,)`, any float dtype.
        grid: (grid_h, grid_w) with grid_h * grid_w == N.
        k1: tokens to keep, 1 <= k1 <= N.
        top_n: candidates per region.
        region_size: side of a region in tokens.

    Returns:
        int64 tensor of shape `(k1,)`, unique indices in ascending (raster) order.
    """
    num_tokens = grid[0] * grid[1]
    scores = _as_scores(salience, num_tokens)
    if not 1 <= k1 <= num_tokens:
        raise ValueError(f"k1 must be between 1 and the {num_tokens} tokens, got {k1}")
    candidates = region_candidates(scores, grid, region_size, top_n)
    if candidates.numel() >= k1:
        kept = candidates[_stable_topk(scores[candidates], k1)]
    else:
        rest_mask = torch.ones(num_tokens, dtype=torch.bool, device=scores.device)
        rest_mask[candidates] = False
        rest = torch.nonzero(rest_mask).squeeze(1)
        fill = rest[_stable_topk(scores[rest], k1 - candidates.numel())]
        kept = torch.cat([candidates, fill])
    return torch.sort(kept).values


def distinctness(features: Tensor) -> Tensor:
    """How much each token differs from the image as a whole: 1 - cosine(token, mean token), clamped at 0.

    Why: attention salience (the CLS row, or attention received) concentrates on a few tokens per object and says
    little about WHICH tokens hold an object. Flat background repeats itself, so its tokens sit close to the
    image's mean direction, and every token of an object, edges and interior alike, sits away from it. On the
    built-in model the top-|objects| tokens by this score cover 96% of the object patches; by CLS attention
    36%, by attention x key norm 42% (`docs/PRUNING.md`). Duplicate-aware pruners (DART) use the same idea with
    pivot tokens; this is the one-pivot form, one matrix-vector product per image.

    Args:
        features: `(N, D)` token features of one image, any float dtype.

    Returns:
        float32 `(N,)` scores in [0, 2], higher = more distinct.
    """
    tokens = torch.nn.functional.normalize(features.float(), dim=-1)
    centre = torch.nn.functional.normalize(tokens.mean(dim=0, keepdim=True), dim=-1)
    return (1.0 - (tokens @ centre.T).squeeze(-1)).clamp_min(0.0)


def aggregate(
    features: Tensor,
    similarity: Tensor,
    salience: Tensor,
    kept: Tensor,
    grid: tuple[int, int],
    radius: float,
    pillar_quantile: float = 0.55,
    convex_rows: bool = False,
    pillar_scores: Tensor | None = None,
    pillar_top_fraction: float = 0.25,
) -> Tensor:
    """Aggregation: mend each kept non-pillar token with similar tokens nearby, so pruned content is not lost.

    W_ij = ReLU(cos(S_i, S_j)) * (1 - min(1, dist(p_i, p_j) / radius)) over all N tokens j (Euclidean grid
    distance). Pillars keep their own features. Other rows are normalised to sum 1 and (code default) the self
    weight is set back to 1; with `convex_rows` the normalised row is used as is. T_i = sum_j W_ij F_j.

    Args:
        features: tensor of shape `(N, D)`, any float dtype; the features fed onwards.
        similarity: tensor of shape `(N, Ds)`; L2-normalised here.
        salience: tensor of shape `(N,)`.
        kept: int64 tensor of shape `(K,)`, indices of the kept tokens (the output follows this order).
        grid: (grid_h, grid_w) with grid_h * grid_w == N.
        radius: proximity radius r in patches (see `proximity_radius`); r <= 0 keeps only the token itself.
        pillar_quantile: kept tokens with salience >= this quantile of the kept salience are pillars.
        convex_rows: use the pure row-normalised weights (paper option).
        pillar_scores: optional tensor of shape `(N,)`; if given, pillars are instead the top
            `pillar_top_fraction` (rounded up) of kept tokens by these scores (paper option: key norm).
        pillar_top_fraction: share of kept tokens that are pillars when `pillar_scores` is given.

    Returns:
        tensor of shape `(K, D)` and dtype `features.dtype`.
    """
    grid_h, grid_w = grid
    num_tokens = grid_h * grid_w
    if features.shape[0] != num_tokens or similarity.shape[0] != num_tokens:
        raise ValueError(
            f"features ({features.shape[0]}) and similarity ({similarity.shape[0]}) must both have "
            f"{num_tokens} rows for a {grid_h}x{grid_w} grid"
        )
    scores = _as_scores(salience, num_tokens)
    kept = kept.to(device=features.device, dtype=torch.long)
    num_kept = kept.numel()
    if num_kept == 0:
        return features[kept]

    is_pillar = _pillars(scores, kept, pillar_quantile, pillar_scores, pillar_top_fraction)
    if bool(is_pillar.all()):
        return features[kept]

    unit = torch.nn.functional.normalize(similarity.float(), dim=-1)
    positions = torch.arange(num_tokens, device=features.device)
    rows, cols = (positions // grid_w).float(), (positions % grid_w).float()
    dense = features.float()
    out = features[kept].clone()
    mend = torch.nonzero(~is_pillar).squeeze(1)  # positions in `kept` of the rows to mend
    # Rows are independent: mend them `step` at a time so the (rows x N) weights stay bounded (a 12.8 MP Qwen
    # image has N = 16384 tokens and K ~ 7000 kept: all rows at once would be ~0.5 GB per temporary).
    step = max(1, AGGREGATE_BUFFER_ELEMENTS // num_tokens)
    for start in range(0, mend.numel(), step):
        targets = kept[mend[start : start + step]]
        weights = _aggregation_weights(unit, rows, cols, targets, radius, convex_rows)
        out[mend[start : start + step]] = (weights @ dense).to(features.dtype)
        del weights  # free this chunk's rows before the next chunk allocates its own
    return out


def _aggregation_weights(
    unit: Tensor, rows: Tensor, cols: Tensor, targets: Tensor, radius: float, convex_rows: bool
) -> Tensor:
    """`(len(targets), N)` float32 aggregation rows of `aggregate` for the kept tokens `targets`."""
    weights = torch.matmul(unit[targets], unit.T).relu_()
    dist = (rows[targets, None] - rows[None]).square_()  # in place: at most three (rows x N) buffers live
    col_gap = (cols[targets, None] - cols[None]).square_()
    dist.add_(col_gap).sqrt_()
    del col_gap
    if radius > 0:
        weights *= dist.div_(-radius).add_(1.0).clamp_(min=0.0)  # proximity 1 - min(1, dist / r)
    else:
        weights *= dist == 0
    del dist
    row_sum = weights.sum(dim=1, keepdim=True)
    self_only = row_sum.squeeze(1) <= 0  # degenerate similarity (zero vector): keep the token itself
    weights /= row_sum.clamp_min(torch.finfo(torch.float32).tiny)
    own = torch.arange(targets.numel(), device=weights.device)
    weights[self_only] = 0.0
    if not convex_rows:
        weights[own, targets] = 1.0
    else:
        weights[own[self_only], targets[self_only]] = 1.0
    return weights


def select_topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the `k` highest scores (ties: lower index), returned in ascending index order, int64."""
    scores = scores.float().reshape(-1)
    if not 0 <= k <= scores.numel():
        raise ValueError(f"k must be between 0 and {scores.numel()}, got {k}")
    return torch.sort(_stable_topk(scores, k)).values


def select_random(num_tokens: int, k: int, seed: int) -> Tensor:
    """`k` distinct random indices of `num_tokens`, deterministic per (num_tokens, k, seed), sorted, int64, CPU."""
    if not 0 <= k <= num_tokens:
        raise ValueError(f"k must be between 0 and {num_tokens}, got {k}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.sort(torch.randperm(num_tokens, generator=generator)[:k]).values


def pool_grid(features: Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Adaptive 2-D average pooling of the token grid (the `pooling` baseline).

    Args:
        features: tensor of shape `(N, D)` with N = grid_h * grid_w.
        grid: (grid_h, grid_w).
        out_grid: (pooled_h, pooled_w), each at most the input side.

    Returns:
        pooled: tensor of shape `(pooled_h * pooled_w, D)`, dtype `features.dtype`, raster order.
        representative: int64 tensor of shape `(pooled_h * pooled_w,)`, the patch nearest each pooled cell's
            centre (lower index on ties), whose position the pooled token takes.
    """
    grid_h, grid_w = grid
    pooled_h, pooled_w = out_grid
    if features.shape[0] != grid_h * grid_w:
        raise ValueError(
            f"features have {features.shape[0]} rows, grid {grid_h}x{grid_w} has {grid_h * grid_w}"
        )
    if not (1 <= pooled_h <= grid_h and 1 <= pooled_w <= grid_w):
        raise ValueError(f"out_grid {out_grid} must be between 1x1 and the grid {grid}")
    dim = features.shape[1]
    image = features.float().T.reshape(1, dim, grid_h, grid_w)
    pooled = torch.nn.functional.adaptive_avg_pool2d(image, (pooled_h, pooled_w))
    pooled = pooled.reshape(dim, pooled_h * pooled_w).T.to(features.dtype)

    def centres(size: int, out: int) -> list[int]:
        # Same bins as adaptive pooling: [floor(i*size/out), ceil((i+1)*size/out)); centre rounded down.
        return [(math.floor(i * size / out) + math.ceil((i + 1) * size / out) - 1) // 2 for i in range(out)]

    centre_rows = torch.tensor(centres(grid_h, pooled_h), dtype=torch.long, device=features.device)
    centre_cols = torch.tensor(centres(grid_w, pooled_w), dtype=torch.long, device=features.device)
    representative = (centre_rows[:, None] * grid_w + centre_cols[None, :]).reshape(-1)
    return pooled, representative


def visionzip_merge(
    features: Tensor, keys: Tensor, salience: Tensor, k_total: int, contextual_fraction: float
) -> tuple[Tensor, Tensor]:
    """VisionZip-style baseline: dominant tokens by salience plus a few merged contextual tokens.

    k_ctx = round(k_total * contextual_fraction) (at least 1 when k_total >= 2, at most k_total - 1). The
    remaining tokens get k_ctx targets spaced uniformly in raster order; every remaining token joins its most
    similar target (cosine of `keys`, ties: lower target) and each group is averaged.

    Args:
        features: tensor of shape `(N, D)`, any float dtype.
        keys: tensor of shape `(N, Dk)` used for the similarity.
        salience: tensor of shape `(N,)`.
        k_total: tokens to return, 1 <= k_total <= N.
        contextual_fraction: share of `k_total` that is contextual.

    Returns:
        merged: tensor of shape `(k_total, D)`, dtype `features.dtype`: dominant tokens in raster order, then the
            contextual tokens in target order.
        source: int64 tensor of shape `(k_total,)`: the dominant token's index, then each group's target index.
    """
    num_tokens = features.shape[0]
    scores = _as_scores(salience, num_tokens)
    if not 1 <= k_total <= num_tokens:
        raise ValueError(f"k_total must be between 1 and the {num_tokens} tokens, got {k_total}")
    num_ctx = round(k_total * contextual_fraction)
    if k_total >= 2:
        num_ctx = min(max(num_ctx, 1), k_total - 1)
    else:
        num_ctx = 0
    dominant = torch.sort(_stable_topk(scores, k_total - num_ctx)).values
    if num_ctx == 0:
        return features[dominant], dominant

    rest_mask = torch.ones(num_tokens, dtype=torch.bool, device=features.device)
    rest_mask[dominant] = False
    rest = torch.nonzero(rest_mask).squeeze(1)
    spacing = torch.arange(num_ctx, device=features.device) * rest.numel() // num_ctx
    targets = rest[spacing]
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    group = torch.argmax(unit[rest] @ unit[targets].T, dim=1)  # first maximum -> lower target on ties
    group[spacing] = torch.arange(num_ctx, device=features.device)  # a target always belongs to its own group
    sums = torch.zeros(num_ctx, features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, group, features[rest].float())
    counts = torch.bincount(group, minlength=num_ctx).clamp_min(1).float()
    contextual = (sums / counts[:, None]).to(features.dtype)
    return torch.cat([features[dominant], contextual]), torch.cat([dominant, targets])


def _repeat_kv(key: Tensor, num_heads: int) -> Tensor:
    """Expand grouped key heads `(Hk, L, d)` to `(num_heads, L, d)` the way transformers' repeat_kv does."""
    num_kv_heads = key.shape[0]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key heads ({num_kv_heads})")
    return key.repeat_interleave(num_heads // num_kv_heads, dim=0)


def _as_scores(salience: Tensor, num_tokens: int) -> Tensor:
    """Flatten to float32 `(N,)`; NaN ranks lowest so a broken score can never win a slot."""
    scores = salience.float().reshape(-1)
    if scores.numel() != num_tokens:
        raise ValueError(f"salience has {scores.numel()} values, expected {num_tokens}")
    return torch.nan_to_num(scores, nan=float("-inf"))


def _stable_topk(scores: Tensor, k: int) -> Tensor:
    """Positions of the `k` largest values, ties broken by lower position (stable descending sort)."""
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def _pillars(
    scores: Tensor, kept: Tensor, quantile: float, pillar_scores: Tensor | None, top_fraction: float
) -> Tensor:
    """Bool mask over `kept`: which kept tokens keep their own features unchanged."""
    num_kept = kept.numel()
    if pillar_scores is not None:
        num_pillars = min(num_kept, math.ceil(top_fraction * num_kept))
        chosen = _stable_topk(_as_scores(pillar_scores, scores.numel())[kept], num_pillars)
        mask = torch.zeros(num_kept, dtype=torch.bool, device=kept.device)
        mask[chosen] = True
        return mask
    kept_scores = scores[kept]
    threshold = torch.quantile(kept_scores, quantile)
    return kept_scores >= threshold


__all__ = [
    "aggregate",
    "attention_column_sum",
    "attention_row",
    "pool_grid",
    "proximity_radius",
    "region_candidates",
    "select_random",
    "select_stage1",
    "select_topk",
    "visionzip_merge",
]

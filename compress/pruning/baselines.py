"""Importance scores for the baselines of the results table: weight magnitude and random.

Both are ranked within each layer and pruned to the same keep ratio in every layer at the same
FLOPs (`search.uniform_masks`), then slimmed like the Fisher masks (no rearrangement, no tuning),
so the table isolates what the Fisher-based selection and the tuning add.
Shapes: per-layer lists `[H_l]` and `[F_l]`, like the Fisher diagonal.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def magnitude_scores(adapter):
    """L2 norm of each head's Q/K/V rows and O columns, and of each filter's input rows and output column."""
    d, heads, filters = adapter.head_dim(), [], []
    for i in range(adapter.num_layers):
        parts = adapter.layer_parts(i)
        if parts.num_heads:
            sq = sum(p.weight.float().view(parts.num_heads if p is parts.q else parts.num_kv_heads, -1).pow(2).sum(1)
                     .repeat_interleave(parts.num_heads // parts.num_kv_heads if p is not parts.q else 1)
                     for p in (parts.q, parts.k, parts.v))
            sq = sq + parts.o.weight.float().view(parts.o.out_features, parts.num_heads, d).pow(2).sum((0, 2))
        else:
            sq = torch.zeros(0)
        heads.append(sq.sqrt().cpu())
        f_sq = sum(p.weight.float().pow(2).sum(1) for p in parts.ffn_in) + parts.ffn_out.weight.float().pow(2).sum(0)
        filters.append(f_sq.sqrt().cpu())
    return heads, filters


def random_scores(adapter, seed: int):
    g = torch.Generator().manual_seed(seed)
    heads = [torch.rand(h, generator=g) for h in adapter.num_heads()]
    filters = [torch.rand(f, generator=g) for f in adapter.num_filters()]
    return heads, filters

"""Mask search and rearrangement under the GQA rule (see compress/arch/gemma.py): tensors in, masks out.

Search. Maximise the kept importance (diagonal Fisher, or a baseline's scores) subject to
`DecoderCost` FLOPs <= budget, where each layer takes one feasible attention shape (g' query heads in
each of Hkv' kv groups, or nothing) and any number of MLP filters. For a shape, the best heads are
found exactly: rank the kv groups by the sum of their g' best query-head scores, keep the Hkv' best
groups and their g' best heads. Shapes across layers are a multiple-choice knapsack, solved by
dynamic programming on the budget cut into `num_bins` bins (shape costs rounded up, so the result
always fits); the filters then fill what is left, best score per FLOP first (exact when all filters
cost the same, as in Gemma), and are refilled with the exact leftover after backtracking.
A caller may hand the search each layer's options with their own values instead (`options`, e.g.
compress.pruning.group_fisher: every feasible mask with the estimated loss of its exact effect).

Rearrangement (Kwon et al. 2022, Sec. 4.2) of a GQA layer's heads: among the masks of the same
shape, the one minimising p^T I p (I the layer's Fisher block, p the pruned indicator), found by
enumerating them all when there are few (Gemma 2/3 have <= 16 heads per layer), else unchanged.
Layers with one kv head or one head per group have no shape constraint: any swap is allowed there.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from compress.pruning.rearrange import block_fisher, rearrange_layer

MAX_ENUMERATION = 200_000


def layer_options(scores: torch.Tensor, group: int) -> list[tuple[int, int, float, torch.Tensor]]:
    """Feasible shapes of one layer: (num_heads, num_kv_heads, kept score, 0/1 mask `[H]`)."""
    scores = torch.as_tensor(scores).double()
    grouped = scores.view(-1, group).sort(dim=1, descending=True)  # [Hkv, g]
    cums = grouped.values.cumsum(dim=1)
    options = [(0, 0, 0.0, torch.zeros(len(scores)))]
    for per in range(1, group + 1):
        ranked = torch.argsort(cums[:, per - 1], descending=True, stable=True)
        for k in range(1, len(ranked) + 1):
            chosen = ranked[:k]
            mask = torch.zeros(cums.shape)
            mask[chosen[:, None], grouped.indices[chosen, :per]] = 1.0
            options.append((k * per, k, float(cums[chosen, per - 1].sum()), mask.flatten()))
    return options


def feasible_masks(num_heads: int, group: int, limit: int) -> list[torch.Tensor] | None:
    """Every GQA-shaped 0/1 mask `[H]` of a layer, the empty one first; None when there are more than `limit`."""
    num_kv = num_heads // group if num_heads else 0
    count = 1 + sum(math.comb(num_kv, k) * math.comb(group, per) ** k
                    for per in range(1, group + 1) for k in range(1, num_kv + 1))
    if count > limit:
        return None
    return [torch.zeros(num_heads)] + [m for per in range(1, group + 1) for k in range(1, num_kv + 1)
                                       for m in _shape_masks(num_kv, group, k, per)]


def search_gqa(head_scores, filter_scores, cost, budget: float, group_sizes, num_bins: int = 20_000,
               options=None, filter_options=None):
    """0/1 head and filter masks with `cost.flops(...) <= budget` and the most kept score. `options`: per layer,
    the attention shapes to choose from as `layer_options` gives them (default: from `head_scores`);
    `filter_options`: per layer, MLP widths to choose from as (filters, value, mask) instead of the fill."""
    if budget <= 0:
        raise ValueError("FLOPs budget must be positive")
    unit = budget / num_bins
    options = options or [layer_options(s, g) for s, g in zip(head_scores, group_sizes)]
    groups = [[(cost.layer_flops(l, h, k, 0), v) for h, k, v, _ in opts] for l, opts in enumerate(options)]
    if filter_options is not None:
        groups += [[(cost.layer_flops(l, 0, 0, n), v) for n, v, _ in opts] for l, opts in enumerate(filter_options)]
    best, choices = _knapsack(groups, unit, num_bins)
    fill = None if filter_options is not None else _FilterFill(filter_scores, cost)
    totals = best if fill is None else best + fill.value(budget - unit * np.arange(num_bins + 1))
    b = int(np.argmax(totals))
    if not np.isfinite(totals[b]):
        raise ValueError("budget too small for any mask")
    picks = _backtrack(choices, b)
    heads = [options[l][p][3].clone() for l, p in enumerate(picks[:len(options)])]
    if fill is None:
        return heads, [filter_options[l][p][2].clone() for l, p in enumerate(picks[len(options):])]
    head_flops = sum(cost.layer_flops(l, options[l][p][0], options[l][p][1], 0) for l, p in enumerate(picks))
    return heads, fill.masks(budget - head_flops)


def _knapsack(groups, unit: float, num_bins: int):
    """Multiple-choice knapsack over `groups` of (FLOPs, value) options: best value per budget bin, and choices."""
    best, choices = np.full(num_bins + 1, -np.inf), []
    best[0] = 0.0
    for opts in groups:
        bins = [math.ceil(flops / unit - 1e-9) for flops, _ in opts]
        best, arg = _knapsack_step(best, bins, [v for _, v in opts])
        choices.append((arg, bins))
    return best, choices


def _knapsack_step(best: np.ndarray, bins: list[int], values: list[float]):
    new, arg = np.full_like(best, -np.inf), np.zeros(len(best), dtype=np.int64)
    for o, (b, v) in enumerate(zip(bins, values)):
        if b >= len(best):
            continue
        cand = np.full_like(best, -np.inf)
        cand[b:] = best[: len(best) - b] + v
        better = cand > new
        new[better], arg[better] = cand[better], o
    return new, arg


def _backtrack(choices, b: int) -> list[int]:
    picks = []
    for arg, bins in reversed(choices):
        o = int(arg[b])
        picks.append(o)
        b -= bins[o]
    return picks[::-1]


class _FilterFill:
    """Filters ranked by score per FLOP; `value(left)` and `masks(left)` of the best prefix that fits."""

    def __init__(self, filter_scores, cost):
        entries = [(float(s), cost.filter_cost[l], l, i)
                   for l, scores in enumerate(filter_scores) for i, s in enumerate(torch.as_tensor(scores).tolist())]
        entries.sort(key=lambda e: -e[0] / e[1])
        self.entries, self.sizes = entries, [len(s) for s in filter_scores]
        self.cum_cost = np.cumsum([e[1] for e in entries]) if entries else np.zeros(0)
        self.cum_value = np.concatenate([[0.0], np.cumsum([e[0] for e in entries])])

    def count(self, left):
        return np.searchsorted(self.cum_cost, np.asarray(left) * (1 + 1e-12), side="right")

    def value(self, left: np.ndarray) -> np.ndarray:
        return np.where(left >= 0, self.cum_value[self.count(np.maximum(left, 0))], -np.inf)

    def masks(self, left: float) -> list[torch.Tensor]:
        masks = [torch.zeros(n) for n in self.sizes]
        for _, _, layer, i in self.entries[: int(self.count(max(left, 0.0)))]:
            masks[layer][i] = 1.0
        return masks


def rearrange_gqa(head_masks, head_grads, group_sizes):
    """Rearranged head masks, each keeping its layer's GQA shape; objective never rises."""
    out = []
    for mask, grads, group in zip(head_masks, head_grads, group_sizes):
        fisher = block_fisher(grads)
        if group == 1 or len(mask) == group:
            out.append(rearrange_layer(mask, fisher))
        else:
            out.append(_best_same_shape(mask, fisher, group))
    return out


def _best_same_shape(mask: torch.Tensor, fisher: torch.Tensor, group: int) -> torch.Tensor:
    kept = (mask != 0).view(-1, group).sum(dim=1)
    k, per = int((kept > 0).sum()), int(kept.max()) if kept.any() else 0
    num_kv = len(kept)
    count = math.comb(num_kv, k) * math.comb(group, per) ** k
    if k == 0 or count > MAX_ENUMERATION:
        return mask.clone()
    candidates = torch.stack(list(_shape_masks(num_kv, group, k, per)))  # [M, H]
    p = 1.0 - candidates.double()
    objective = torch.einsum("mh,hj,mj->m", p, fisher.double(), p)
    current = (mask == 0).double()
    if float(objective.min()) >= float(current @ fisher.double() @ current):
        return mask.clone()
    return candidates[int(torch.argmin(objective))].to(mask.dtype)


def _shape_masks(num_kv: int, group: int, k: int, per: int):
    inside = list(itertools.combinations(range(group), per))
    for groups in itertools.combinations(range(num_kv), k):
        for heads in itertools.product(inside, repeat=k):
            mask = torch.zeros(num_kv, group)
            for g, hs in zip(groups, heads):
                mask[g, list(hs)] = 1.0
            yield mask.flatten()

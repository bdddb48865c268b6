"""Mask search under a FLOPs or latency budget (Kwon et al. 2022, Sec. 4.1): tensors in, masks out.

Inputs are per-layer importance scores (diagonal Fisher for the paper's method, `[H_l]` and `[F_l]`,
all >= 0) and a cost model; outputs are 0/1 masks of the same shapes. Never touches a model.

FLOPs: maximise the total kept importance subject to sum(kept costs) <= budget. Items of equal cost
are interchangeable except for their score, so the best choice of n items of one cost is the n best
scores. `search_flops` enumerates every combination of counts over the distinct costs except the
largest group, which is filled greedily with what budget is left: this is exact (for BERT there is
one head cost and one filter cost, so it is a 1-D enumeration, as in the paper).
Iterative search (`compress prune --search-steps K`): `alive` masks leave the units pruned at an
earlier step out of the candidate sets, so the result is the exact optimum over the units still
alive and a pruned unit is never revived; `flops_schedule` gives the per-step budgets.
Latency: attention latency is not linear in the head count, so `search_latency` solves the
multiple-choice knapsack over layers (heads per layer, FFN width per layer on a grid) by dynamic
programming on the budget discretised into bins (costs rounded up, so the result always fits).
Given a FLOPs budget as well, it keeps both, through a Lagrangian penalty on FLOPs (`_with_flops`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_COMBINATIONS = 5_000_000


def search_flops(head_scores, filter_scores, head_cost, filter_cost, budget: float, alive=None):
    """Exact best masks with FLOPs <= budget. `*_cost[l]`: FLOPs of one head/filter of layer l.
    `alive`: optional (head_masks, filter_masks); only units where they are nonzero can be kept."""
    groups = _cost_groups(head_scores, filter_scores, head_cost, filter_cost, alive)
    if not groups:  # nothing alive: all masks stay zero
        return _masks_from_groups(groups, {}, head_scores, filter_scores)
    fill = max(range(len(groups)), key=lambda g: len(groups[g][1]))
    rest = [g for g in range(len(groups)) if g != fill]
    counts = _count_grid([len(groups[g][1]) for g in rest])  # [C, len(rest)]
    used = counts @ np.array([groups[g][0] for g in rest], dtype=np.float64) if rest else np.zeros(1)
    value = sum((_prefix(groups[g][1])[counts[:, k]] for k, g in enumerate(rest)), np.zeros(len(counts)))
    fill_cost, fill_items = groups[fill][0], groups[fill][1]
    left = budget * (1 + 1e-12) - used
    n_fill = np.clip(np.floor(left / fill_cost + 1e-9), 0, len(fill_items)).astype(np.int64)
    value = np.where(left >= 0, value + _prefix(fill_items)[n_fill], -np.inf)
    best = int(np.argmax(value))
    if not np.isfinite(value[best]):
        raise ValueError("budget too small for any mask")
    chosen = {g: int(counts[best, k]) for k, g in enumerate(rest)}
    chosen[fill] = int(n_fill[best])
    return _masks_from_groups(groups, chosen, head_scores, filter_scores)


def _cost_groups(head_scores, filter_scores, head_cost, filter_cost, alive=None):
    """[(cost, [(score, kind, layer, index)] sorted by score descending)] per distinct (kind, cost),
    the units outside `alive` (head_masks, filter_masks) left out."""
    alive_heads, alive_filters = alive or (None, None)
    by_cost: dict[tuple, list] = {}
    for kind, scores, costs, keep in (("head", head_scores, head_cost, alive_heads),
                                      ("filter", filter_scores, filter_cost, alive_filters)):
        for layer, (s, c) in enumerate(zip(scores, costs)):
            allowed = None if keep is None else torch.as_tensor(keep[layer]).ne(0).tolist()
            for i, v in enumerate(torch.as_tensor(s).double().tolist()):
                if allowed is None or allowed[i]:
                    by_cost.setdefault((kind, float(c)), []).append((v, kind, layer, i))
    return [(cost, sorted(items, key=lambda t: -t[0])) for (_, cost), items in by_cost.items()]


def _prefix(items) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum([t[0] for t in items])])


def _count_grid(sizes: list[int]) -> np.ndarray:
    total = math.prod(n + 1 for n in sizes)
    if total > MAX_COMBINATIONS:
        raise ValueError(f"too many cost classes for the exact search ({total} combinations)")
    if not sizes:
        return np.zeros((1, 0), dtype=np.int64)
    grids = np.meshgrid(*[np.arange(n + 1) for n in sizes], indexing="ij")
    return np.stack([g.reshape(-1) for g in grids], axis=1)


def _masks_from_groups(groups, chosen, head_scores, filter_scores):
    heads = [torch.zeros(len(s)) for s in head_scores]
    filters = [torch.zeros(len(s)) for s in filter_scores]
    for g, n in chosen.items():
        for _, kind, layer, i in groups[g][1][:n]:
            (heads if kind == "head" else filters)[layer][i] = 1.0
    return heads, filters


def flops_schedule(final: float, steps: int) -> list[float]:
    """Per-step FLOPs targets of an iterative search, linear in FLOPs from 1.0 to `final`:
    f_i = 1 - (1 - final) * i / steps, so every step removes the same share of the dense FLOPs
    (a geometric schedule would remove more early, while the Fisher still sees the dense model).
    The last target is `final` itself (not recomputed), so one step is exactly the one-shot search."""
    return [1.0 - (1.0 - final) * i / steps for i in range(1, steps)] + [final]


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(len(scores))
    if k > 0:
        mask[torch.argsort(torch.as_tensor(scores).double(), descending=True, stable=True)[:k]] = 1.0
    return mask


def search_latency(head_scores, filter_scores, table, budget_ms: float, num_bins: int = 4000,
                   width_step: int | None = None, flops=None, alive=None, min_last_heads: int = 0):
    """Best masks whose summed layer latency (from `table`) is <= budget_ms; with `flops` =
    (head_cost, filter_cost, budget), also FLOPs <= budget (Lagrangian relaxation, `_with_flops`).
    FFN widths: the table's own when it is `exact_widths`, else every `width_step` (n // 64) filters.
    `alive`: optional (head_masks, filter_masks); only units where they are nonzero can be kept.
    `min_last_heads`: the last layer keeps at least this many heads (of those alive)."""
    options = []  # per group: (costs[ms], values, counts, unit FLOPs)
    head_cost, filter_cost, _ = flops or ([0.0] * len(head_scores), [0.0] * len(filter_scores), None)
    head_scores, filter_scores = _alive_scores(head_scores, alive and alive[0]), _alive_scores(filter_scores, alive and alive[1])
    for layer, (scores, unit) in enumerate(zip(head_scores, head_cost)):
        alive_heads = _num_alive(scores)
        low = min(min_last_heads, alive_heads) if layer == len(head_scores) - 1 else 0
        counts = np.arange(low, alive_heads + 1)
        if len(table.attention_ms) < len(scores) + 1:
            raise ValueError(f"the latency table covers {len(table.attention_ms) - 1} heads, a layer has {len(scores)}")
        options.append((np.array([table.attention_ms[h] for h in counts]), _sorted_prefix(scores)[counts], counts, unit))
    for scores, unit in zip(filter_scores, filter_cost):
        counts = _width_options(_num_alive(scores), table, width_step)
        options.append((np.array([table.ffn(f) for f in counts]), _sorted_prefix(scores)[counts], counts, unit))
    groups = [(c, v) for c, v, _, _ in options]
    if flops is None:
        picks = _knapsack(groups, budget_ms, num_bins)
    else:
        picks = _with_flops(groups, [counts * unit for _, _, counts, unit in options], flops[2], budget_ms, num_bins)
    heads = [top_k_mask(s, int(o[2][p])) for s, o, p in zip(head_scores, options, picks)]
    filters = [top_k_mask(s, int(o[2][p])) for s, o, p in zip(filter_scores, options[len(head_scores):],
                                                               picks[len(head_scores):])]
    return heads, filters


def _alive_scores(scores, masks):
    """Scores as float64, with the units outside `masks` (None: none) at -inf: never kept, sorted last."""
    out = [torch.as_tensor(s).double() for s in scores]
    if masks is None:
        return out
    return [s.masked_fill(torch.as_tensor(m) == 0, -math.inf) for s, m in zip(out, masks)]


def _num_alive(scores) -> int:
    return int(torch.isfinite(scores).sum())


def _width_options(n: int, table, width_step: int | None) -> np.ndarray:
    if table.exact_widths:
        return np.array([w for w in table.ffn_widths if w <= n] + ([n] if n not in table.ffn_widths else []))
    step = width_step or max(1, n // 64)
    return np.unique(np.append(np.arange(0, n + 1, step), n))


def _with_flops(groups, group_flops, flops_budget: float, budget_ms: float, num_bins: int,
                iters: int = 40) -> list[int]:
    """The latency knapsack with a second budget, on FLOPs: maximise value - mu * FLOPs under the
    latency budget, mu >= 0 the smallest (found by bisection) whose picks also fit the FLOPs budget.
    Every answer fits both budgets; it is the optimum when the FLOPs budget is slack at mu = 0, and
    near it otherwise (the relaxation may leave a little of the FLOPs budget unused)."""
    def solve(mu):
        picks = _knapsack([(c, v - mu * f) for (c, v), f in zip(groups, group_flops)], budget_ms, num_bins)
        used = sum(float(f[p]) for f, p in zip(group_flops, picks))
        value = sum(float(v[p]) for (_, v), p in zip(groups, picks))
        return picks, used, value

    picks, used, _ = solve(0.0)
    if used <= flops_budget * (1 + 1e-12):
        return picks
    full_value = sum(float(v[-1]) for _, v in groups)
    full_flops = sum(float(f[-1]) for f in group_flops) or 1.0
    lo, hi = 0.0, full_value / full_flops
    best = None
    for _ in range(60):  # grow hi until its picks fit
        picks, used, value = solve(hi)
        if used <= flops_budget * (1 + 1e-12):
            best = (value, picks)
            break
        lo, hi = hi, hi * 4
    if best is None:
        raise ValueError("no masks fit both the latency and the FLOPs budget")
    for _ in range(iters):
        mid = (lo + hi) / 2
        picks, used, value = solve(mid)
        if used <= flops_budget * (1 + 1e-12):
            hi = mid
            best = max(best, (value, picks), key=lambda t: t[0])
        else:
            lo = mid
    return best[1]


def _sorted_prefix(scores) -> np.ndarray:
    """[0, best, best + second, ...] over the finite scores (units outside `alive` are -inf)."""
    s = np.sort(torch.as_tensor(scores).double().numpy())[::-1]
    return np.concatenate([[0.0], np.cumsum(s[np.isfinite(s)])])


def _knapsack(groups, budget: float, num_bins: int) -> list[int]:
    """Multiple-choice knapsack: one option per group, max total value, total cost <= budget."""
    if budget <= 0:
        raise ValueError("latency budget leaves nothing for the encoder layers")
    unit = budget / num_bins
    best = np.full(num_bins + 1, -np.inf)
    best[0] = 0.0
    choice = []
    for costs, values in groups:
        bins = np.maximum(np.ceil(costs / unit - 1e-9), 0).astype(np.int64)  # a negative cost is free
        new, arg = np.full_like(best, -np.inf), np.zeros(len(best), dtype=np.int64)
        for o, (b, v) in enumerate(zip(bins, values)):
            if b > num_bins:
                continue
            cand = np.full_like(best, -np.inf)
            cand[b:] = best[: len(best) - b] + v
            better = cand > new
            new[better], arg[better] = cand[better], o
        best = new
        choice.append(arg)
    b = int(np.argmax(best))
    if not np.isfinite(best[b]):
        raise ValueError("latency budget too small for any mask")
    picks = []
    for (costs, _), arg in zip(reversed(groups), reversed(choice)):
        o = int(arg[b])
        picks.append(o)
        b -= max(int(np.ceil(costs[o] / unit - 1e-9)), 0)
    return picks[::-1]


def uniform_masks(head_scores, filter_scores, head_cost, filter_cost, budget: float):
    """Baseline: the same keep ratio in every layer, ranked within each layer by the given scores."""
    full = sum(len(s) * c for s, c in zip(head_scores, head_cost)) + sum(
        len(s) * c for s, c in zip(filter_scores, filter_cost))
    ratio = min(budget / full, 1.0)
    k_heads = [math.floor(ratio * len(s) + 0.5) for s in head_scores]
    left = budget - sum(k * c for k, c in zip(k_heads, head_cost))
    if left < 0:
        k_heads = [math.floor(ratio * len(s)) for s in head_scores]
        left = budget - sum(k * c for k, c in zip(k_heads, head_cost))
    ffn_full = sum(len(s) * c for s, c in zip(filter_scores, filter_cost))
    f_ratio = min(max(left / ffn_full, 0.0), 1.0) if ffn_full else 0.0
    k_filters = [math.floor(f_ratio * len(s) + 1e-9) for s in filter_scores]
    heads = [top_k_mask(s, k) for s, k in zip(head_scores, k_heads)]
    filters = [top_k_mask(s, k) for s, k in zip(filter_scores, k_filters)]
    return heads, filters

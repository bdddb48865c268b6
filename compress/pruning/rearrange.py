"""Mask rearrangement within each layer with the block-diagonal Fisher (Kwon et al. 2022, Sec. 4.2).

The search decides how many heads and filters each layer keeps using only the diagonal Fisher.
Given those counts, the pruned set P of a layer should minimise the second-order loss estimate
(1 - m)^T I (1 - m) = p^T I p, with I = G^T G / N that layer's Fisher block (G: per-example mask
gradients `[N, n]`) and p the 0/1 indicator of P. Starting from the searched mask, this local
search applies the best single swap (un-prune i, prune j) while it lowers the objective; the count
is unchanged and the objective never rises (at most 256 swaps per layer, which bounds the time
on 3072-filter layers; every swap taken is an improvement). Swap gain, for i in P and j kept:
    delta(i, j) = I_ii + I_jj - 2 I_ij - 2 (I p)_i + 2 (I p)_j.

Iterative search (`compress prune --search-steps K`): the Fisher of the last step is taken at the
masks of step K-1 (compress.pruning.fisher), so p^T I p is the second-order loss of the last step's change
only when p ranges over the units alive at step K-1: a unit pruned earlier is 0 at the expansion
point and stays 0 (no change, no term), while its gradient row is the effect of reviving it, a
different quantity that the objective does not model. So `alive` restricts each layer's swaps (and
its Fisher block) to the units alive at step K-1; earlier-pruned units stay pruned, as in the search.
With one step everything is alive and this is the paper's rearrangement.
"""

from __future__ import annotations

import torch


def objective(mask: torch.Tensor, fisher: torch.Tensor) -> float:
    p = (mask == 0).double()
    return float(p @ fisher.double() @ p)


def block_fisher(grads: torch.Tensor) -> torch.Tensor:
    """`[n, n]` empirical Fisher of one layer from `[N, n]` per-example gradients."""
    g = grads.double()
    return g.T @ g / max(g.shape[0], 1)


def rearrange_layer(mask: torch.Tensor, fisher: torch.Tensor, max_swaps: int | None = None) -> torch.Tensor:
    """Best-swap local search on one layer's 0/1 mask; returns a mask with the same number of ones."""
    fisher = fisher.double()
    p = (mask == 0).double()
    if p.sum() == 0 or p.sum() == len(p):
        return mask.clone()
    diag, fp = fisher.diagonal(), fisher @ p
    for _ in range(max_swaps if max_swaps is not None else min(2 * len(p), 256)):
        pruned, kept = p.nonzero().flatten(), (p == 0).nonzero().flatten()
        delta = (diag[pruned, None] + diag[None, kept] - 2 * fisher[pruned][:, kept]
                 - 2 * fp[pruned, None] + 2 * fp[None, kept])
        k = int(torch.argmin(delta))
        if delta.flatten()[k] >= -1e-12 * max(float(diag.abs().max()), 1e-30):
            break
        i, j = int(pruned[k // len(kept)]), int(kept[k % len(kept)])
        p[i], p[j] = 0.0, 1.0
        fp += fisher[:, j] - fisher[:, i]
    return (p == 0).to(mask.dtype)


def rearrange(masks: list[torch.Tensor], grads: list[torch.Tensor], alive=None, device=None) -> list[torch.Tensor]:
    """Rearrange every layer's mask (heads or filters) with its own Fisher block; with `alive`
    (per-layer masks), only among the units alive there, the others staying as they are. The swaps run
    on `device` (default: the gradients'); on a GPU a 3072-filter layer's 256 swaps take well under a
    second instead of seconds on the host. Masks come back on their own device."""
    out = []
    for i, (mask, g) in enumerate(zip(masks, grads)):
        g = g.to(device) if device is not None else g
        if alive is None:  # every unit may move
            out.append(rearrange_layer(mask.to(g.device), block_fisher(g)).to(mask.device))
            continue
        idx = torch.as_tensor(alive[i]).ne(0).nonzero().flatten()
        new = mask.clone()
        new[idx] = rearrange_layer(mask[idx].to(g.device), block_fisher(g[:, idx.to(g.device)])).to(mask.device)
        out.append(new)
    return out

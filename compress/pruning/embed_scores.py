"""Mask gradients of an embedding model without labels: the Fisher of a distillation loss.

The loss is the squared distance between the masked model's embedding e(m) and the dense model's
(the pooled output the model serves, normalised where it normalises). At the dense point (m = 1) its
gradient is zero, but its Hessian is not: it is J^T J with J = de/dm, the Gauss-Newton matrix, exact
here because the residual is zero, and the Fisher of the Gaussian likelihood N(e(m), I) whose negative
log the loss is. So it is what the task Fisher approximates for a classifier: the second-order growth
of the loss when units are masked. A random direction r ~ N(0, I) gives one row r^T J, and
E[J^T r r^T J] = J^T J, so `num_projections` rows per example (one backward each, the masks copied per
example as in compress.pruning.fisher) estimate it without one backward per embedding dimension.

Shapes: head_grads[l] `[R, H_l]`, filter_grads[l] `[R, F_l]`, R = examples x projections (float32, CPU);
the search takes their mean square (fisher.fisher_diagonal), the rearrangement their outer products.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from compress.pruning.fisher import leaf_masks

NUM_PROJECTIONS = 4  # rows per example: the estimate's variance falls as 1/(examples x projections)


def embedding_gradients(embedder, adapter, batches, device, progress: bool = True, masks=None, label: str = "",
                        num_projections: int = NUM_PROJECTIONS, seed: int = 0):
    """Per-example, per-projection gradients of r^T e(m) w.r.t. the head and filter masks (at `masks`,
    default all ones), over `batches` of model inputs."""
    embedder.eval()
    gen = torch.Generator().manual_seed(seed)
    heads, filters = [[] for _ in adapter.num_heads()], [[] for _ in adapter.num_filters()]
    for batch in tqdm(batches, desc=f"fisher (embedding){label}", unit="batch", disable=not progress):
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        hm, fm = leaf_masks(adapter, masks, batch["input_ids"].shape[0], device)
        with adapter.masks(hm, fm):
            embedding = embedder(**batch)  # [B, D]
        for j in range(num_projections):
            r = torch.randn(embedding.shape, generator=gen).to(device)
            grads = torch.autograd.grad((embedding * r).sum(), hm + fm, allow_unused=True,
                                        retain_graph=j + 1 < num_projections)
            for store, m, g in zip(heads + filters, hm + fm, grads):
                store.append((g if g is not None else torch.zeros_like(m)).detach().float().cpu())
    embedder.zero_grad(set_to_none=True)
    return [torch.cat(g) for g in heads], [torch.cat(g) for g in filters]

"""Fisher information of head and filter masks from per-example mask gradients (Kwon et al. 2022, Sec. 3).

The masks are 1 everywhere; their gradient of the task loss, one per calibration example, gives the
empirical Fisher I = mean_i g_i g_i^T. The search uses its diagonal, the rearrangement its
per-layer blocks. Per-example gradients come from one backward per batch: each example gets its
own copy of the masks (`[B, H_l]`, `[B, F_l]`) and the loss is summed over examples, so the
gradient of example i's copy is exactly example i's gradient.

Shapes: head_grads[l] is `[N, H_l]`, filter_grads[l] `[N, F_l]` (float32, CPU).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed per-example loss: cross entropy for classification, squared error for regression."""
    if labels.dtype.is_floating_point:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="sum")
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def mask_gradients(model, adapter, batches, device, progress: bool = True):
    """Per-example gradients of the loss w.r.t. head and filter masks, over all `batches`."""
    model.eval()  # no dropout: the Fisher is of the deterministic network
    heads, filters = [[] for _ in adapter.num_heads()], [[] for _ in adapter.num_filters()]
    for batch in tqdm(batches, desc="fisher", unit="batch", disable=not progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels", None)  # None: a QA batch (start/end positions, compress.qa_task)
        b = batch["input_ids"].shape[0]
        hm = [torch.ones(b, h, device=device, requires_grad=True) for h in adapter.num_heads()]
        fm = [torch.ones(b, f, device=device, requires_grad=True) for f in adapter.num_filters()]
        with adapter.masks(hm, fm):
            loss = task_loss(model(**batch).logits, labels) if labels is not None else _span_loss(model, batch)
        grads = torch.autograd.grad(loss, hm + fm, allow_unused=True)
        for store, m, g in zip(heads + filters, hm + fm, grads):
            store.append((g if g is not None else torch.zeros_like(m)).detach().float().cpu())
    model.zero_grad(set_to_none=True)
    return [torch.cat(g) for g in heads], [torch.cat(g) for g in filters]


def _span_loss(model, batch):
    from compress.qa_task import summed_span_loss

    return summed_span_loss(model, batch)


def fisher_diagonal(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Diagonal of the empirical Fisher per layer: mean of squared per-example gradients."""
    return [g.pow(2).mean(0) for g in grads]

"""Fisher information of head and filter masks from per-example mask gradients (Kwon et al. 2022, Sec. 3).

The masks are 1 everywhere; their gradient of the task loss, one per calibration example, gives the
empirical Fisher I = mean_i g_i g_i^T. The search uses its diagonal, the rearrangement its
per-layer blocks. Per-example gradients come from one backward per batch: each example gets its
own copy of the masks (`[B, H_l]`, `[B, F_l]`) and the loss is summed over examples, so the
gradient of example i's copy is exactly example i's gradient.

Two Fishers (`kind`):
- "empirical" (the paper's): the loss at the gold label. Each example's gradient is scaled by how
  wrong the model is on it, so on a training sample the model fits well (a fine-tuned regressor on
  its own train split: residuals near 0) the estimate rests on a few badly fit examples.
- "model": the Fisher of the model's own predictive distribution, E_{y ~ p(.|x)} of the outer product
  of the log-likelihood gradient; to second order it is the KL divergence between the dense and the
  masked model's outputs, which is what pruning should preserve. Classification, exact: for each
  class c a row sqrt(p_c) * grad(-log p_c) (C backward passes per batch, p detached), so the rows'
  outer products sum to J^T (diag(p) - p p^T) J. Regression with a unit-variance Gaussian: the row
  is the output's own gradient (Gauss-Newton J^T J), whatever the residual. QA spans keep the
  empirical Fisher (a distribution over every token position is too many classes).

Iterative search (`compress prune --search-steps K`): `masks` sets the point the gradients are taken
at to the masks of the previous step instead of all ones, so each unit's score is that of the
already-pruned model (a head whose layer-mates are gone can matter more than it did beside them).
The gradient of a unit whose mask is 0 is the first-order effect of reviving it; the search ignores it.

Shapes: head_grads[l] is `[R, H_l]`, filter_grads[l] `[R, F_l]` (float32, CPU), R = N examples for the
empirical Fisher, N x classes for the model Fisher of a classifier; the Fisher is mean over rows
times a constant, which neither the search nor the rearrangement sees.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from compress.pruning.config import FISHERS
from compress.train.loop import task_loss


def mask_gradients(model, adapter, batches, device, progress: bool = True, kind: str = "empirical",
                   masks=None, label: str = ""):
    """Per-example (per example and class, for the model Fisher of a classifier) gradients of the
    log-likelihood w.r.t. head and filter masks, over all `batches`. `masks`: optional
    (head_masks, filter_masks), `[H_l]` and `[F_l]`, applied while taking them (default all ones);
    `label` is appended to the progress bar's name."""
    if kind not in FISHERS:
        raise ValueError(f"unknown Fisher {kind!r}; choose one of {', '.join(FISHERS)}")
    model.eval()  # no dropout: the Fisher is of the deterministic network
    heads, filters = [[] for _ in adapter.num_heads()], [[] for _ in adapter.num_filters()]
    for batch in tqdm(batches, desc=f"fisher ({kind}){label}", unit="batch", disable=not progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels", None)  # None: a QA batch (start/end positions, compress.train.qa)
        b = batch["input_ids"].shape[0]
        hm, fm = leaf_masks(adapter, masks, b, device)
        with adapter.masks(hm, fm):
            if labels is None:
                losses = [_span_loss(model, batch)]
            elif kind == "empirical":
                losses = [task_loss(model(**batch).logits, labels)]
            else:
                losses = _model_losses(model(**batch).logits, regression=labels.dtype.is_floating_point)
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, hm + fm, allow_unused=True, retain_graph=i + 1 < len(losses))
            for store, m, g in zip(heads + filters, hm + fm, grads):
                store.append((g if g is not None else torch.zeros_like(m)).detach().float().cpu())
    model.zero_grad(set_to_none=True)
    return [torch.cat(g) for g in heads], [torch.cat(g) for g in filters]


def leaf_masks(adapter, masks, b: int, device):
    """Per-example copies of the masks (`[B, H_l]`, `[B, F_l]`) to take gradients against."""
    if masks is None:
        return ([torch.ones(b, h, device=device, requires_grad=True) for h in adapter.num_heads()],
                [torch.ones(b, f, device=device, requires_grad=True) for f in adapter.num_filters()])
    return tuple([m.to(device, torch.float32).expand(b, -1).clone().requires_grad_() for m in group]
                 for group in masks)


def _model_losses(logits: torch.Tensor, regression: bool) -> list[torch.Tensor]:
    """Summed-over-examples scalars whose per-example gradients are the model Fisher's rows."""
    if regression:
        return [logits.squeeze(-1).float().sum()]
    logp = logits.float().log_softmax(-1)
    weight = logp.detach().exp().sqrt()  # sqrt(p_c): the rows' outer products weigh class c by p_c
    return [-(weight[:, c] * logp[:, c]).sum() for c in range(logp.shape[-1])]


def _span_loss(model, batch):
    from compress.data.qa import batch_span_loss

    return batch_span_loss(model, batch, reduction="sum")  # one backward, a gradient per window


def fisher_diagonal(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Diagonal of the empirical Fisher per layer: mean of squared per-example gradients."""
    return [g.pow(2).mean(0) for g in grads]

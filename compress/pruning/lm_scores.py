"""Importance of decoder heads and filters: LM-loss Fisher, and the activation-norm baseline.

Fisher (Kwon et al. 2022, Sec. 3, with the language-modelling loss instead of a task loss): each
calibration window is one example; its loss is the mean next-token NLL over the window, and the
gradient of that loss w.r.t. per-example copies of the masks (`[B, H_l]`, `[B, F_l]`) is the
example's gradient. The LM head of a Gemma (vocab 256k) would need `[B, S, V]` logits with their
autograd state; instead the final hidden states are detached, the loss is pushed through the head
chunk by chunk into their gradient, and that gradient is then back-propagated through the layers
once. Model weights get no gradient. Output shapes as in `compress.pruning.fisher`: `[N, H_l]`, `[N, F_l]`.

Activation-norm baseline (Wanda, Sun et al. 2023, made structured as in FLAP's comparison):
score of an input column j of o_proj / down_proj = ||X_j||_2 * sum_i |W_ij| over the calibration
tokens; a head's score sums its head_dim columns, a filter's is its column's.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from compress.device import autocast

LOSS_CHUNK = 128  # positions per LM-head chunk: bounds the [B, chunk, vocab] logits in memory


@contextlib.contextmanager
def frozen_weights(model):
    """No weight gradients inside the block (mask gradients only); restores requires_grad after."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def lm_loss_grad(adapter, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Gradient of sum_b mean_t NLL(b, t) w.r.t. `hidden` `[B, S, hidden]`, chunked over positions."""
    h = hidden.detach().requires_grad_(True)
    targets = input_ids[:, 1:]
    n_pred = targets.shape[1]
    total = 0.0
    for t0 in range(0, n_pred, LOSS_CHUNK):
        t1 = min(t0 + LOSS_CHUNK, n_pred)
        logits = adapter.lm_logits(h[:, t0:t1]).float()  # [B, c, V]; on the LM head's device when spread
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, t0:t1].flatten().to(logits.device),
                                                reduction="sum")
        (nll / n_pred).backward()
        total += float(nll.detach())
    return h.grad, total / n_pred


def lm_mask_gradients(model, adapter, batches, device, progress: bool = True):
    """Per-window gradients of the LM loss w.r.t. head and filter masks, over all `batches`."""
    model.eval()
    heads, filters = [[] for _ in adapter.num_heads()], [[] for _ in adapter.num_filters()]
    losses = []
    with frozen_weights(model):
        for batch in tqdm(batches, desc="fisher (LM loss)", unit="batch", disable=not progress):
            ids = batch["input_ids"].to(device)
            hm, fm = leaf_masks(adapter, len(ids))
            with adapter.masks(hm, fm), autocast(ids.device):  # bf16 on the GPU: Fisher needs no more
                hidden = adapter.final_hidden(ids)
            grad_hidden, loss = lm_loss_grad(adapter, hidden, ids)
            grads = torch.autograd.grad(hidden, hm + fm, grad_outputs=grad_hidden, allow_unused=True)
            for store, m, g in zip(heads + filters, hm + fm, grads):
                store.append((g if g is not None else torch.zeros_like(m)).detach().float().cpu())
            losses.append(loss / len(ids))
    return [torch.cat(g) for g in heads], [torch.cat(g) for g in filters], sum(losses) / max(len(losses), 1)


def leaf_masks(adapter, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """All-ones per-example masks (`[B, H_l]`, `[B, F_l]`) to take gradients against, each on its layer's device."""
    return ([torch.ones(batch_size, h, device=d, requires_grad=True)
             for h, d in zip(adapter.num_heads(), adapter.head_devices())],
            [torch.ones(batch_size, f, device=d, requires_grad=True)
             for f, d in zip(adapter.num_filters(), adapter.filter_devices())])


@torch.no_grad()
def activation_scores(model, adapter, batches, device, progress: bool = True):
    """Wanda-style structured scores: per head `[H_l]` and per filter `[F_l]`, from calibration activations."""
    sq_heads = [torch.zeros(adapter.layer_parts(i).o.in_features, device=d)
                for i, d in enumerate(adapter.head_devices())]
    sq_filters = [torch.zeros(f, device=d) for f, d in zip(adapter.num_filters(), adapter.filter_devices())]
    hooks = []
    for i in range(adapter.num_layers):
        parts = adapter.layer_parts(i)
        hooks.append(parts.o.register_forward_pre_hook(_accumulate_sq(sq_heads[i])))
        hooks.append(parts.ffn_out.register_forward_pre_hook(_accumulate_sq(sq_filters[i])))
    try:
        for batch in tqdm(batches, desc="activation norms", unit="batch", disable=not progress):
            adapter.final_hidden(batch["input_ids"].to(device))
    finally:
        for h in hooks:
            h.remove()
    heads, filters = [], []
    for i in range(adapter.num_layers):
        parts = adapter.layer_parts(i)
        col = sq_heads[i].sqrt() * parts.o.weight.float().abs().sum(0)
        heads.append(col.view(parts.num_heads, -1).sum(1).cpu() if parts.num_heads else torch.zeros(0))
        filters.append((sq_filters[i].sqrt() * parts.ffn_out.weight.float().abs().sum(0)).cpu())
    return heads, filters


def _accumulate_sq(store: torch.Tensor):
    def hook(module, args):
        store.add_(args[0].float().pow(2).flatten(0, -2).sum(0))
    return hook

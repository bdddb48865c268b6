"""`--method fisher-group`: each layer's attention options costed by the Fisher of their exact effect.

Why a new head score. Gemma 2/3 normalise each branch's output (`post_attention_layernorm`, an RMSNorm)
before it joins the residual stream, so the loss does not change when all heads of a layer are scaled
together: a window's head-mask gradients sum to ~0 per layer, and the diagonal Fisher, which views each
mask going from 1 to 0 alone and linearly, misprices removing a large part of a layer's few heads (Gemma 3
270M: 4 query heads on 1 kv head). What is left is renormalised, and removing every head removes the branch
(RMSNorm of 0 is 0). `evals/results/gemma_pruning_fisher_mlp.md` shows it: keeping all heads beat the
diagonal Fisher's choice at every FLOPs level.

Score. For each GQA-shaped head mask q of a layer (all of them where a layer has at most `MAX_MASKS`, else
the diagonal Fisher's best mask per shape, `gqa.layer_options`), the exact change of the normalised branch
output at every token, delta_q = norm(sum_h q_h c_h) - norm(sum_h c_h) (c_h: head h's term of o_proj's
output, `[B, S, hidden]`), is taken to the loss to first order per calibration window,
z_q = sum_t g_t . delta_q,t (g_t: gradient of the window's mean NLL w.r.t. the residual stream after the
branch), and costed E_windows[z_q^2]. That is the empirical-Fisher estimate of twice the loss increase, the
same estimate the diagonal Fisher gives a filter (E[g_j^2]), so the search trades head options (value
-cost) against filters (value E[g_j^2]) on one scale. One pass computes both; the filters' rearrangement
is unchanged and the heads need none (every candidate mask is already costed).

`--method fisher-width` costs the MLPs the same way: the layer's filters ranked by their diagonal Fisher (a
first pass), each of `MLP_LEVELS + 1` widths (keep the n best) costed by the exact change of the MLP's
normalised output, and the search picks one width per layer (value -cost) instead of filling filters one
by one.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from compress.device import autocast
from compress.pruning import gqa
from compress.pruning.decoder_cost import kept_kv_heads
from compress.pruning.lm_scores import (
    frozen_weights,
    leaf_masks,
    lm_loss_grad,
    lm_mask_gradients,
)

MAX_MASKS = 64  # per layer; Gemma 3 270M/1B have 16, Gemma 2 2B 96 (then the per-shape best of the diagonal)
MLP_LEVELS = 32  # fisher-width: MLP widths costed per layer (0, 1/32, ..., all of its filters)


def group_fisher_scores(model, adapter, batches, device, groups: list[int], progress: bool = True,
                        mlp_levels: int = 0):
    """(head diagonal `[H_l]`, filter diagonal `[F_l]`, head grads, filter grads, options, filter options, loss):
    `options[l]` lists `(num_heads, num_kv_heads, -cost, mask [H_l])` for `gqa.search_gqa`; with `mlp_levels`,
    `filter options[l]` lists `(num_filters, -cost, mask [F_l])` for `mlp_levels + 1` widths (the diagonal
    Fisher's best filters of the layer kept), else None."""
    candidates = [gqa.feasible_masks(h, g, MAX_MASKS) if h else [torch.zeros(0)]
                  for h, g in zip(adapter.num_heads(), groups)]
    orders = widths = None
    if any(c is None for c in candidates) or mlp_levels:  # a first pass ranks heads within shapes, filters
        head_grads, filter_grads, _ = lm_mask_gradients(model, adapter, batches, device, progress)
        candidates = [c if c is not None else [o[3] for o in gqa.layer_options(g.pow(2).mean(0), grp)]
                      for c, g, grp in zip(candidates, head_grads, groups)]
        if mlp_levels:
            orders = [g.pow(2).mean(0).argsort(descending=True) for g in filter_grads]
            widths = [sorted({round(k * f / mlp_levels) for k in range(mlp_levels + 1)}) for f in adapter.num_filters()]
    head_grads, filter_grads, sq, sq_mlp, loss = _fisher_pass(model, adapter, batches, device, candidates, orders,
                                                              widths, progress)
    num = max(sum(len(b["input_ids"]) for b in batches), 1)
    options = [[(int(m.sum()), kept_kv_heads(m, grp) if len(m) else 0, -float(s) / num, m)
                for m, s in zip(masks, sums)] for masks, sums, grp in zip(candidates, sq, groups)]
    filter_options = None if not mlp_levels else [
        [(n, -float(s) / num, _top(order, n)) for n, s in zip(ws, sums)]
        for order, ws, sums in zip(orders, widths, sq_mlp)]
    return ([g.pow(2).mean(0) for g in head_grads], [g.pow(2).mean(0) for g in filter_grads], head_grads,
            filter_grads, options, filter_options, loss)


def _top(order: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(len(order))
    mask[order[:n]] = 1.0
    return mask


def _fisher_pass(model, adapter, batches, device, candidates, orders, widths, progress):
    """Per-window mask gradients (as `lm_mask_gradients`) and, per layer, sum over windows of z^2 per candidate
    head mask and (with `orders`) per MLP width."""
    layers = range(adapter.num_layers)
    heads, filters, losses = [[] for _ in layers], [[] for _ in layers], []
    sq = [torch.zeros(len(c), dtype=torch.float64) for c in candidates]
    sq_mlp = [torch.zeros(len(w), dtype=torch.float64) for w in widths] if widths else None
    model.eval()
    with frozen_weights(model):
        for batch in tqdm(batches, desc="fisher (head groups)", unit="batch", disable=not progress):
            ids = batch["input_ids"].to(device)
            hm, fm = leaf_masks(adapter, len(ids))
            with adapter.masks(hm, fm), _Taps(adapter, mlp=widths is not None) as taps, autocast(ids.device):
                hidden = adapter.final_hidden(ids)
            grad_hidden, loss = lm_loss_grad(adapter, hidden, ids)
            grads = torch.autograd.grad(hidden, hm + fm, grad_outputs=grad_hidden, allow_unused=True)
            for store, m, g in zip(heads + filters, hm + fm, grads):
                store.append((g if g is not None else torch.zeros_like(m)).detach().float().cpu())
            for (kind, layer), x in taps.inputs.items():
                parts, g = adapter.layer_parts(layer), taps.grads[(kind, layer)]
                if kind == "attention":
                    sq[layer] += option_effects(parts, x, g, candidates[layer]).double().pow(2).sum(0).cpu()
                else:
                    z = width_effects(parts, x, g, orders[layer], widths[layer])
                    sq_mlp[layer] += z.double().pow(2).sum(0).cpu()
            losses.append(loss / len(ids))
    return ([torch.cat(g) for g in heads], [torch.cat(g) for g in filters], sq, sq_mlp,
            sum(losses) / max(len(losses), 1))


@torch.no_grad()
def width_effects(parts, x: torch.Tensor, g: torch.Tensor, order: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """`[B, W]`: z of keeping the first `n` filters of `order` for each n of `widths` (ascending), from
    down_proj's input `x` `[B, S, F]` and the gradient `g` `[B, S, hidden]` after the MLP's post-norm."""
    w, x, g = parts.ffn_out.weight.float()[:, order], x.float()[..., order], g.float()
    norm = parts.ffn_norm
    base = norm(x @ w.T).float()
    kept, done, effects = torch.zeros_like(base), 0, []
    for n in widths:
        kept = kept + x[..., done:n] @ w[:, done:n].T
        done = n
        effects.append((g * (norm(kept).float() - base)).sum((1, 2)))
    return torch.stack(effects, 1)


@torch.no_grad()
def option_effects(parts, x: torch.Tensor, g: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """`[B, M]`: z of each mask, from o_proj's input `x` `[B, S, H*D]` and the gradient `g` `[B, S, hidden]`."""
    b, s, _ = x.shape
    w = parts.o.weight.float().view(parts.o.out_features, parts.num_heads, -1)  # [hidden, H, D]
    contrib = torch.einsum("bshd,ohd->bsho", x.float().view(b, s, parts.num_heads, -1), w)  # [B, S, H, hidden]
    norm, g = parts.attn_norm, g.float()
    base = norm(contrib.sum(2)).float()
    effects = []
    for mask in masks:
        kept = torch.einsum("bsho,h->bso", contrib, mask.to(contrib))
        effects.append((g * (norm(kept).float() - base)).sum((1, 2)))
    return torch.stack(effects, 1)


class _Taps:
    """Hooks that keep each branch's output-projection input and the gradient reaching its post-norm's output,
    keyed (kind, layer): every attention layer with heads, and with `mlp` every MLP."""

    def __init__(self, adapter, mlp: bool = False):
        self.adapter, self.mlp, self.inputs, self.grads, self.handles = adapter, mlp, {}, {}, []

    def __enter__(self):
        for layer in range(self.adapter.num_layers):
            parts = self.adapter.layer_parts(layer)
            branches = [("attention", parts.o, parts.attn_norm)] if parts.num_heads else []
            branches += [("mlp", parts.ffn_out, parts.ffn_norm)] if self.mlp else []
            for kind, proj, norm in branches:
                self.handles.append(proj.register_forward_pre_hook(self._keep_input((kind, layer))))
                self.handles.append(norm.register_forward_hook(self._keep_grad((kind, layer))))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _keep_input(self, key):
        def hook(module, args):
            self.inputs[key] = args[0].detach()
        return hook

    def _keep_grad(self, key):
        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(lambda grad: self.grads.__setitem__(key, grad.detach()))
        return hook

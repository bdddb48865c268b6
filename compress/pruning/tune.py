"""Mask tuning by layer-wise least squares (Kwon et al. 2022, Sec. 4.3).

After the search fixes which heads and filters stay, their mask values are tuned so that each
pruned layer reproduces the dense model's output. Layers are tuned in order, attention then FFN,
each with the already-tuned earlier layers in place. For a branch with kept units K:
- reconstruction point: the input of the norm after the branch (see compress/arch/base.py), the
  dense ("teacher") value T and the pruned ("student") value S on the same calibration tokens;
- unit k's contribution A_k `[tokens, hidden]` is its slice of the output projection applied to its
  slice of the projection input; S = S_rest + sum_k m_k A_k, so with b = T - S_rest,
  min_m ||sum_k m_k A_k - b||^2 + lam ||m - 1||^2,  lam = damp * 1e-2 * mean(diag(A^T A)),
  solved from the normal equations (fp64, torch, on the model's device). The damping pulls the
  scales toward the binary mask (which is feasible), so the reconstruction error never rises.
Statistics are accumulated batch by batch (Gram matrix `[K, K]`, never the `[tokens, hidden, K]` A).

`tune_weights` goes past the paper: instead of one scale per kept unit it refits the kept input
columns of the branch's output projection and its bias on the same reconstruction problem,
min_W ||Z W^T + c - b||^2 + lam ||(W, c) - (W0, c0)||^2 with Z the kept units' (masked) outputs, a
ridge regression toward the current weights with the same damping rule. It has hidden-size times
more free parameters than the masks, so it undoes much more of what pruning removed; the slimmed
model shape is unchanged. Teacher targets then come from the original weights, restored for the
teacher's forward pass.

Both run by default through compress.pruning.tune_layerwise (each layer once per pass, on cached hidden
states); the code here that re-runs the model from the embedding for every layer and branch is the
reference it is tested against (`layerwise=False`).
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from compress.pruning.lstsq import accumulate_branch, branch_setup, solve_branch


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once the layer of interest has been seen."""


def tune_masks(model, adapter, batches, head_masks, filter_masks, device, damp: float = 1.0,
               progress: bool = True, layerwise: bool = True):
    """Tuned (real-valued) masks, same shapes as the 0/1 inputs, plus per-layer errors before/after.
    `layerwise` (default): compress.pruning.tune_layerwise, one layer pass at a time on cached hidden states;
    False: the reference path here, a forward from the embedding for every layer and branch."""
    tuner = _layerwise if layerwise else _reference
    return tuner(model, adapter, batches, head_masks, filter_masks, device, damp, progress, False)


def tune_weights(model, adapter, batches, head_masks, filter_masks, device, damp: float = 1.0,
                 progress: bool = True, layerwise: bool = True):
    """Refit, layer by layer, the output projections' kept columns and biases (in place, see the module
    docstring); the masks are returned unchanged, with the same per-layer error report as `tune_masks`.
    `layerwise` as in `tune_masks` (the reference path restores the original weights for each teacher pass)."""
    tuner = _layerwise if layerwise else _reference
    return tuner(model, adapter, batches, head_masks, filter_masks, device, damp, progress, True)


def _reference(model, adapter, batches, head_masks, filter_masks, device, damp, progress, weights):
    heads = [m.clone().float().to(device) for m in head_masks]
    filters = [m.clone().float().to(device) for m in filter_masks]
    originals = _projection_copies(adapter) if weights else []
    report = []
    for layer in tqdm(range(adapter.num_layers), desc="tune weights" if weights else "tune", unit="layer",
                      disable=not progress):
        with _restored(originals):
            targets = _teacher_targets(model, adapter, batches, layer, device)
        entry = {}
        for branch, masks in (("attention", heads), ("ffn", filters)):
            stats = _student_stats(model, adapter, batches, layer, branch, heads, filters, targets, device, weights)
            entry[branch] = solve_branch(stats, masks, layer, damp, weights)
        report.append(entry)
    return [m.cpu() for m in heads], [m.cpu() for m in filters], report


def _layerwise(model, adapter, batches, head_masks, filter_masks, device, damp, progress, weights):
    from compress.pruning.tune_layerwise import tune_layerwise

    return tune_layerwise(model, adapter, batches, head_masks, filter_masks, device, damp, progress, weights,
                          forward=lambda batch: _run(model, batch, device),
                          valid=[_valid(batch, device) for batch in batches])


def _valid(batch, device) -> torch.Tensor:
    return batch["attention_mask"].to(device).bool()


def _run(model, batch, device) -> None:
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    try:
        model(**inputs)
    except _Stop:
        pass


@torch.no_grad()
def _teacher_targets(model, adapter, batches, layer, device):
    """Dense-model inputs of layer `layer`'s two norms, valid tokens only, per batch."""
    parts, out = adapter.layer_parts(layer), []
    for batch in batches:
        grab, valid = {}, _valid(batch, device)

        def at_attn(mod, args):
            grab["attention"] = args[0][valid].float()

        def at_ffn(mod, args):
            grab["ffn"] = args[0][valid].float()
            raise _Stop

        hooks = [parts.attn_norm.register_forward_pre_hook(at_attn), parts.ffn_norm.register_forward_pre_hook(at_ffn)]
        try:
            _run(model, batch, device)
        finally:
            for h in hooks:
                h.remove()
        out.append(grab)
    return out


@torch.no_grad()
def _student_stats(model, adapter, batches, layer, branch, heads, filters, targets, device, weights=False):
    """Gram matrix, right-hand side and squared norms for one branch of `layer` under the current masks:
    over the kept units' mask values, or with `weights` over the output projection's kept columns and bias."""
    br, stats = branch_setup(adapter, layer, branch, heads, filters, weights)
    for batch, target in zip(batches, targets):
        grab, valid = {}, _valid(batch, device)

        def at_proj(mod, args):
            grab["x"] = args[0][valid].float()

        def at_norm(mod, args):
            grab["s"] = args[0][valid].float()
            raise _Stop

        hooks = [br.proj.register_forward_pre_hook(at_proj, prepend=True), br.norm.register_forward_pre_hook(at_norm)]
        try:
            with adapter.masks(heads, filters):
                _run(model, batch, device)
        finally:
            for h in hooks:
                h.remove()
        accumulate_branch(stats, br, grab, target[branch], weights)
    return stats


def _projection_copies(adapter) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, copy of its value) for every output projection's weight and bias."""
    out = []
    for layer in range(adapter.num_layers):
        parts = adapter.layer_parts(layer)
        for proj in (parts.o, parts.ffn_out):
            out += [(p, p.detach().clone()) for p in (proj.weight, proj.bias) if p is not None]
    return out


@contextlib.contextmanager
def _restored(originals):
    """The original projection weights in place for the duration (the dense teacher), then the tuned ones."""
    tuned = [p.detach().clone() for p, _ in originals]
    with torch.no_grad():
        for p, orig in originals:
            p.copy_(orig)
    try:
        yield
    finally:
        with torch.no_grad():
            for (p, _), t in zip(originals, tuned):
                p.copy_(t)

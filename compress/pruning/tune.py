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
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


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


@dataclass
class Branch:
    """One branch of a layer under tuning: its output projection, the norm after it, its kept units."""

    kind: str  # "attention" | "ffn"
    parts: object
    proj: torch.nn.Module
    norm: torch.nn.Module
    keep: torch.Tensor  # indices of the kept heads or filters
    scale: torch.Tensor  # their current mask values

    def contributions(self, x):
        return _contributions(x, self.proj.weight.float(), self.keep, self.kind, self.parts)


def branch_setup(adapter, layer, branch, heads, filters, weights: bool = False) -> tuple[Branch, dict]:
    """The branch of `layer` and empty least-squares statistics over its kept units' mask values, or with
    `weights` over the output projection's kept columns and bias."""
    parts = adapter.layer_parts(layer)
    proj, norm = (parts.o, parts.attn_norm) if branch == "attention" else (parts.ffn_out, parts.ffn_norm)
    mask = (heads if branch == "attention" else filters)[layer]
    keep = mask.nonzero().flatten()
    br = Branch(branch, parts, proj, norm, keep, mask[keep])
    stats = {"gram": 0.0, "rhs": 0.0, "b2": 0.0, "err": 0.0, "keep": keep}
    if weights:
        stats.update(cols=_unit_columns(br), branch=br)
    return br, stats


def accumulate_branch(stats, br: Branch, grab: dict, target: torch.Tensor, weights: bool) -> None:
    """Add one batch: `grab` holds the projection input "x" (absent if it never ran) and the norm input "s"."""
    if weights and "x" in grab:  # no unit left still leaves the bias to fit
        _accumulate_weights(stats, br, grab["x"], grab["s"], target)
    elif "x" not in grab or len(br.keep) == 0:
        stats["err"] += float((grab["s"] - target).double().pow(2).sum())
    else:
        _accumulate(stats, br.contributions(grab["x"]), br.scale, grab["s"], target)


def solve_branch(stats, masks: list, layer: int, damp: float, weights: bool) -> dict:
    """Solve one branch: tune `masks[layer]` in place of the list, or the projection's weights; its errors."""
    if weights:
        return _solve_weights(stats, damp)
    masks[layer], errors = _solve(stats, masks[layer], damp)
    return errors


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


def _contributions(x, weight, keep, branch, parts):
    """Per-unit contributions `[n, K, hidden]` (heads) or the factors (act `[n, K]`, W `[hidden, K]`) (filters)."""
    if branch == "attention":
        n, heads = x.shape[0], parts.num_heads
        ctx = x.view(n, heads, -1)[:, keep]  # [n, K, D]
        w = weight.view(weight.shape[0], heads, -1)[:, keep]  # [hidden, K, D]
        return torch.einsum("nkd,okd->nko", ctx, w)
    return x[:, keep], weight[:, keep]


def _accumulate(stats, contrib, m, s, t):
    if isinstance(contrib, tuple):
        act, w = contrib
        current = (act * m) @ w.T
        b = t - (s - current)
        gram = (act.T @ act) * (w.T @ w)
        rhs = ((b @ w) * act).sum(0)
    else:
        current = torch.einsum("nko,k->no", contrib, m)
        b = t - (s - current)
        gram = torch.einsum("nko,njo->kj", contrib, contrib)
        rhs = torch.einsum("nko,no->k", contrib, b)
    stats["gram"] = stats["gram"] + gram.double()
    stats["rhs"] = stats["rhs"] + rhs.double()
    stats["b2"] += float(b.double().pow(2).sum())
    stats["err"] += float((s - t).double().pow(2).sum())


def _solve(stats, mask, damp):
    """Damped least-squares scales for the kept units; errors before/after for the report."""
    keep = stats["keep"]
    if len(keep) == 0 or not torch.is_tensor(stats["gram"]):
        return mask, {"error_before": stats["err"], "error_after": stats["err"]}
    gram, rhs = stats["gram"], stats["rhs"]
    lam = damp * 1e-2 * float(gram.diagonal().mean()) + 1e-12
    eye = torch.eye(len(keep), dtype=gram.dtype, device=gram.device)
    prior = mask[keep].double()
    scales = torch.linalg.solve(gram + lam * eye, rhs + lam * prior)
    after = float(scales @ gram @ scales - 2 * scales @ rhs) + stats["b2"]
    if after > stats["err"]:  # only by rounding; keep the binary mask then
        return mask, {"error_before": stats["err"], "error_after": stats["err"]}
    tuned = mask.clone()
    tuned[keep] = scales.to(tuned.dtype)
    return tuned, {"error_before": stats["err"], "error_after": max(after, 0.0)}


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


def _unit_columns(br: Branch) -> torch.Tensor:
    """Input columns of the output projection that belong to the kept units (a head: its D columns)."""
    if br.kind == "ffn":
        return br.keep
    d = br.proj.in_features // br.parts.num_heads
    return (br.keep[:, None] * d + torch.arange(d, device=br.keep.device)).flatten()


def _unit_inputs(br: Branch, x: torch.Tensor) -> torch.Tensor:
    """The kept units' masked outputs `[n, columns]`: what the projection's kept columns multiply."""
    if br.kind == "ffn":
        return x[:, br.keep] * br.scale
    n, d = x.shape[0], br.proj.in_features // br.parts.num_heads
    return (x.view(n, br.parts.num_heads, d)[:, br.keep] * br.scale[:, None]).reshape(n, -1)


def _accumulate_weights(stats, br: Branch, x, s, t):
    z = _unit_inputs(br, x)
    w = br.proj.weight.float()[:, stats["cols"]]
    bias = br.proj.bias
    current = z @ w.T + (bias.float() if bias is not None else 0.0)
    b = t - (s - current)
    if bias is not None:
        z = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
    stats["gram"] = stats["gram"] + (z.T @ z).double()
    stats["rhs"] = stats["rhs"] + (z.T @ b).double()
    stats["b2"] += float(b.double().pow(2).sum())
    stats["err"] += float((s - t).double().pow(2).sum())


@torch.no_grad()
def _solve_weights(stats, damp: float) -> dict:
    """Ridge solution for the kept columns (and bias), written into the projection; errors before/after."""
    if not torch.is_tensor(stats["gram"]) or stats["gram"].shape[0] == 0:  # nothing ran, or no column nor bias
        return {"error_before": stats["err"], "error_after": stats["err"]}
    gram, rhs, cols, proj = stats["gram"], stats["rhs"], stats["cols"], stats["branch"].proj
    prior = proj.weight[:, cols].double().T  # [columns, hidden]
    if proj.bias is not None:
        prior = torch.cat([prior, proj.bias.double()[None]], dim=0)
    lam = damp * 1e-2 * float(gram.diagonal().mean()) + 1e-12
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    sol = torch.linalg.solve(gram + lam * eye, rhs + lam * prior)
    after = float((sol * (gram @ sol)).sum() - 2 * (sol * rhs).sum()) + stats["b2"]
    if after > stats["err"]:  # only by rounding; keep the weights then
        return {"error_before": stats["err"], "error_after": stats["err"]}
    weight = proj.weight.data
    weight[:, cols] = sol[: len(cols)].T.to(weight.dtype)
    if proj.bias is not None:
        proj.bias.data.copy_(sol[-1].to(proj.bias.dtype))
    return {"error_before": stats["err"], "error_after": max(after, 0.0)}

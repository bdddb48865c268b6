"""The least-squares problem of one branch of one layer (Kwon et al. 2022, Sec. 4.3, and its weight variant).

A branch (a layer's attention or FFN) is described by its output projection, the norm after it and its
kept units. Statistics are accumulated batch by batch from the projection's input and the norm's input
(the student) against the dense model's norm input (the teacher target), then solved: for the kept units'
mask scales (`weights=False`, the paper) or for the projection's kept columns and bias (`weights=True`).
compress.pruning.tune states the objective and damping; compress.pruning.tune (reference path) and
compress.pruning.tune_layerwise (default path) both feed these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

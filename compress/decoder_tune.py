"""Layer-local mask tuning for decoders: the least squares of compress.tune, one layer at a time.

`compress.tune` re-runs the model from the embedding up to layer l for every layer and branch,
which costs ~L^2/2 layer passes; for an 18-layer Gemma on a CPU that is most of the pruning time.
Here the dense ("teacher") and pruned ("student") hidden states entering layer l are kept for every
calibration batch, so each layer is run only on its own inputs: ~4 passes of one layer per layer.
The layer's other inputs (position embeddings, the sliding or full causal mask) are captured once,
per layer, by pre-hooks during one dense forward, so nothing here knows how a Gemma builds them.

The objective, the reconstruction points (each branch's output before its post-norm, fp32
statistics, fp64 solve) and the damping are exactly those of `compress.tune`, whose accumulation
and solver are reused; the result equals `compress.tune.tune_masks` up to float rounding.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from compress.tune import _accumulate, _solve, branch_setup


class _Stop(Exception):
    """Raised in a hook to end a pass once what is needed has been captured."""


@torch.no_grad()
def tune_masks_layerwise(model, adapter, batches, head_masks, filter_masks, device, damp: float = 1.0,
                         progress: bool = True):
    """Tuned masks (same shapes as the 0/1 inputs) and per-layer errors, like `compress.tune.tune_masks`."""
    heads = [m.clone().float().to(device) for m in head_masks]
    filters = [m.clone().float().to(device) for m in filter_masks]
    inputs, layer_kwargs = _capture(model, adapter, batches, device)
    teacher, student, report = inputs, [h.clone() for h in inputs], []
    for layer in tqdm(range(adapter.num_layers), desc="tune", unit="layer", disable=not progress):
        block, kwargs = adapter.layer_modules()[layer], [k[layer] for k in layer_kwargs]
        targets, teacher = _teacher(adapter, layer, block, teacher, kwargs)
        entry = {}
        for branch, masks in (("attention", heads), ("ffn", filters)):
            stats = _branch_stats(adapter, layer, block, branch, student, kwargs, heads, filters, targets)
            masks[layer], entry[branch] = _solve(stats, masks[layer], damp)
        with adapter.masks(heads, filters):
            student = [_layer_out(block, h, kw) for h, kw in zip(student, kwargs)]
        report.append(entry)
    return [m.cpu() for m in heads], [m.cpu() for m in filters], report


def _capture(model, adapter, batches, device):
    """Hidden states entering layer 0 per batch, and each layer's other call arguments per batch."""
    blocks, inputs, layer_kwargs = adapter.layer_modules(), [], []
    for batch in batches:
        seen = {}

        def grab(index):
            def hook(module, args, kwargs):
                if index == 0:
                    inputs.append(args[0] if args else kwargs["hidden_states"])
                seen[index] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            return hook

        hooks = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            adapter.final_hidden(batch["input_ids"].to(device))
        finally:
            for h in hooks:
                h.remove()
        layer_kwargs.append([seen[i] for i in range(len(blocks))])
    return inputs, layer_kwargs


def _layer_out(block, hidden, call):
    args, kwargs = call
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _run_until(block, hidden, call, hooks):
    try:
        _layer_out(block, hidden, call)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()


def _teacher(adapter, layer, block, teacher, kwargs):
    """Dense branch outputs (before the post-norms) of `layer`, and the dense inputs of the next layer."""
    parts, targets, nxt = adapter.layer_parts(layer), [], []
    for hidden, call in zip(teacher, kwargs):
        grab = {}
        hooks = [parts.attn_norm.register_forward_pre_hook(lambda m, a: grab.__setitem__("attention", _flat(a[0]))),
                 parts.ffn_norm.register_forward_pre_hook(lambda m, a: grab.__setitem__("ffn", _flat(a[0])))]
        try:
            nxt.append(_layer_out(block, hidden, call))
        finally:
            for h in hooks:
                h.remove()
        targets.append(grab)
    return targets, nxt


def _branch_stats(adapter, layer, block, branch, student, kwargs, heads, filters, targets):
    br, stats = branch_setup(adapter, layer, branch, heads, filters)
    for hidden, call, target in zip(student, kwargs, targets):
        grab = {}

        def at_norm(module, args):
            grab["s"] = _flat(args[0])
            raise _Stop

        hooks = [br.proj.register_forward_pre_hook(lambda m, a: grab.__setitem__("x", _flat(a[0])), prepend=True),
                 br.norm.register_forward_pre_hook(at_norm)]
        with adapter.masks(heads, filters):
            _run_until(block, hidden, call, hooks)
        if "x" not in grab or len(br.keep) == 0:
            stats["err"] += float((grab["s"] - target[branch]).double().pow(2).sum())
            continue
        _accumulate(stats, br.contributions(grab["x"]), br.scale, grab["s"], target[branch])
    return stats


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()  # [tokens, features]: calibration windows have no padding

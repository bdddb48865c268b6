"""Layer-local least-squares tuning: the objective of compress.pruning.tune, one layer at a time.

`compress.pruning.tune`'s reference path re-runs the model from the embedding up to layer l for every layer
and branch, which costs ~L^2/2 layer passes. Here the dense ("teacher") and pruned ("student")
hidden states entering layer l are kept for every calibration batch, so each layer is run only on
its own inputs: ~4 passes of one layer per layer. The layer's other inputs (attention masks,
position embeddings or MPNet's relative bias, a Gemma's sliding or full causal mask) are captured
once, per layer, by pre-hooks during one dense forward, so nothing here knows how a model builds them.

The objective, the reconstruction points (each branch's output before its post-norm, fp32
statistics over the valid tokens, fp64 solve), the damping and both unknowns (the mask scales, or
with `weights` the output projections' kept columns and bias) are exactly those of `compress.pruning.tune`,
whose accumulation and solvers (compress.pruning.lstsq) are reused; the result equals the reference path up to float rounding.
The teacher needs no weight restoring: layer l's teacher pass runs before layer l is tuned, and
earlier layers are never run again.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from compress.pruning.lstsq import accumulate_branch, branch_setup, solve_branch


class _Stop(Exception):
    """Raised in a hook to end a pass once what is needed has been captured."""


@torch.no_grad()
def tune_layerwise(model, adapter, batches, head_masks, filter_masks, device, damp: float = 1.0,
                   progress: bool = True, weights: bool = False, forward=None, valid=None):
    """Tuned masks (or, with `weights`, the masks unchanged and the output projections refitted in place)
    and per-layer errors before/after. `forward(batch)` runs the whole dense model on a batch (default: a
    decoder's `adapter.final_hidden`); `valid[b]`: batch b's non-padding tokens (default: all)."""
    heads = [m.clone().float().to(d) for m, d in zip(head_masks, adapter.head_devices())]
    filters = [m.clone().float().to(d) for m, d in zip(filter_masks, adapter.filter_devices())]
    forward = forward or (lambda batch: adapter.final_hidden(batch["input_ids"].to(device)))
    valid = valid or [None] * len(batches)
    inputs, layer_calls = _capture(adapter, batches, forward)
    teacher, student, report = inputs, [h.clone() for h in inputs], []
    desc = "tune weights" if weights else "tune"
    for layer in tqdm(range(adapter.num_layers), desc=desc, unit="layer", disable=not progress):
        block, calls = adapter.layer_modules()[layer], [c[layer] for c in layer_calls]
        targets, teacher = _teacher(adapter, layer, block, teacher, calls, valid)
        entry = {}
        for branch, masks in (("attention", heads), ("ffn", filters)):
            if masks[layer].numel() == 0:  # a slimmed parent's empty branch: no units, nothing to tune
                entry[branch] = {"error_before": None, "error_after": None}
                continue
            stats = _branch_stats(adapter, layer, block, branch, student, calls, valid, heads, filters, targets,
                                  weights)
            entry[branch] = solve_branch(stats, masks, layer, damp, weights)
        with adapter.masks(heads, filters):
            student = [_layer_out(block, h, call) for h, call in zip(student, calls)]
        report.append(entry)
    return [m.cpu() for m in heads], [m.cpu() for m in filters], report


def _capture(adapter, batches, forward):
    """Hidden states entering layer 0 per batch, and each layer's other call arguments per batch."""
    blocks, inputs, layer_calls = adapter.layer_modules(), [], []
    for batch in batches:
        seen = {}

        def grab(index, seen):
            def hook(module, args, kwargs):
                if index == 0:
                    inputs.append(args[0] if args else kwargs["hidden_states"])
                seen[index] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            return hook

        hooks = [b.register_forward_pre_hook(grab(i, seen), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            forward(batch)
        finally:
            for h in hooks:
                h.remove()
        layer_calls.append([seen[i] for i in range(len(blocks))])
    return inputs, layer_calls


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


def _teacher(adapter, layer, block, teacher, calls, valid):
    """Dense branch outputs (before the post-norms) of `layer`, and the dense inputs of the next layer."""
    parts, targets, nxt = adapter.layer_parts(layer), [], []
    for hidden, call, keep in zip(teacher, calls, valid):
        grab = {}
        hooks = [parts.attn_norm.register_forward_pre_hook(_store(grab, "attention", keep)),
                 parts.ffn_norm.register_forward_pre_hook(_store(grab, "ffn", keep))]
        try:
            nxt.append(_layer_out(block, hidden, call))
        finally:
            for h in hooks:
                h.remove()
        targets.append(grab)
    return targets, nxt


def _branch_stats(adapter, layer, block, branch, student, calls, valid, heads, filters, targets, weights):
    br, stats = branch_setup(adapter, layer, branch, heads, filters, weights)
    for hidden, call, keep, target in zip(student, calls, valid, targets):
        grab = {}
        hooks = [br.proj.register_forward_pre_hook(_store(grab, "x", keep), prepend=True),
                 br.norm.register_forward_pre_hook(_store(grab, "s", keep, stop=True))]
        with adapter.masks(heads, filters):
            _run_until(block, hidden, call, hooks)
        accumulate_branch(stats, br, grab, target[branch], weights)
    return stats


def _store(grab: dict, key: str, keep, stop: bool = False):
    """A pre-hook that keeps its input's valid rows in `grab[key]` and, with `stop`, ends the pass there."""
    def hook(module, args):
        grab[key] = _rows(args[0], keep)
        if stop:
            raise _Stop
    return hook


def _rows(x: torch.Tensor, keep) -> torch.Tensor:
    """`[tokens, features]` fp32 of the valid tokens (`keep` None: every token, e.g. unpadded windows)."""
    return (x.reshape(-1, x.shape[-1]) if keep is None else x[keep]).float()

"""Depth pruning of a decoder: whole layers removed, chosen by block influence or by a greedy KL search.

`block-influence` (ShortGPT, Men et al. 2024): a layer's influence is 1 - cos(x_in, x_out) of the residual stream
entering and leaving it, averaged over the calibration tokens; the `drop_layers` layers of lowest influence go, from
one forward pass. `greedy-kl`: layers go one at a time, each time the one whose removal (on top of those already
removed) moves the next-token distributions least from the dense model's, KL(dense || pruned) on the calibration
windows; about L * N masked forward passes. Block influence misses that a late layer which turns the stream little
can still decide the next token; the KL search measures the next-token distributions themselves, which is what
a draft (or a distilled student) is judged by.
Dropped layers get all-zero head and filter masks; slimming then leaves them with 0 heads and 0 filters. With Gemma's
sandwich norms such a layer is the identity on the residual stream (each branch adds post_norm(0) = 0, since
Gemma has no attention or MLP bias), so the runtime skips it (serve.models.gemma) and a model with half its
layers dropped costs about half the layer time per decode step. Layers already empty do not count and are
never chosen again.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from compress.device import autocast
from compress.errors import UserError


def layer_scores(method: str, adapter, batches, device, num_drop: int, progress: bool, record: dict) -> torch.Tensor:
    """[L] importance of each layer (lowest: dropped first) by `method`, what it found kept in `record`.
    greedy-kl: the KL at the step that dropped a layer, inf for the layers it keeps."""
    if method == "block-influence":
        influence = block_influence(adapter, batches, device, progress)
        record["block_influence"] = [round(float(v), 5) for v in influence]
        return influence
    parent = (adapter.num_heads(), adapter.num_kv_heads(), adapter.num_filters())
    dropped, record["greedy_kl"] = greedy_kl(adapter, batches, device, num_drop, parent, progress)
    scores = torch.full((len(parent[0]),), float("inf"))
    scores[dropped] = torch.tensor(record["greedy_kl"])
    return scores


@torch.no_grad()
def block_influence(adapter, batches, device, progress: bool = True) -> torch.Tensor:
    """[L] fp32: 1 - mean cosine of each layer's input and output hidden states over the calibration tokens."""
    layers = adapter.layer_modules()
    total, count = torch.zeros(len(layers), dtype=torch.float64), 0
    seen: dict[int, torch.Tensor] = {}

    def hook(i):
        def on_forward(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]          # [B, S, hidden]
            x_out = output[0] if isinstance(output, tuple) else output
            seen[i] = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1).sum().cpu()
        return on_forward

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in tqdm(batches, desc="block influence", unit="batch", disable=not progress):
            ids = batch["input_ids"].to(device)
            adapter.final_hidden(ids)
            total += torch.stack([seen[i] for i in range(len(layers))]).double()
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return (1.0 - total / count).float()


def empty_layers(parent) -> list[int]:
    """Layers of a parent shape (heads, kv heads, filters per layer) with no heads and no filters."""
    return [i for i, (h, f) in enumerate(zip(parent[0], parent[2])) if h == 0 and f == 0]


def candidates(num_drop: int, parent) -> list[int]:
    """The layers that may be dropped (those not already empty); a UserError unless `num_drop` of them can go and
    one stays."""
    found = [i for i in range(len(parent[0])) if i not in empty_layers(parent)]
    if not 0 < num_drop < len(found):
        raise UserError(f"cannot drop {num_drop} of the {len(found)} non-empty layers (keep at least one)")
    return found


def layers_to_drop(influence: torch.Tensor, num_drop: int, parent) -> list[int]:
    """The `num_drop` layers of lowest influence among those not already empty, in layer order."""
    ranked = sorted(candidates(num_drop, parent), key=lambda i: float(influence[i]))
    return sorted(ranked[:num_drop])


def depth_masks(parent, dropped: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Head and filter masks: zeros on the dropped layers, ones elsewhere."""
    heads = [torch.full((h,), 0.0 if i in dropped else 1.0) for i, h in enumerate(parent[0])]
    filters = [torch.full((f,), 0.0 if i in dropped else 1.0) for i, f in enumerate(parent[2])]
    return heads, filters


@torch.no_grad()
def greedy_kl(adapter, batches, device, num_drop: int, parent, progress: bool = True) -> tuple[list[int], list[float]]:
    """(layers in the order dropped, the calibration KL after each step)."""
    layers = candidates(num_drop, parent)
    ids = [batch["input_ids"].to(device) for batch in batches]
    with autocast(device):
        dense = [adapter.final_hidden(x) for x in ids]                    # [B, S, hidden] per batch
    dropped, trace = [], []
    bar = tqdm(total=sum(len(layers) - n for n in range(num_drop)), desc="greedy KL", unit="pass",
               disable=not progress)
    for _ in range(num_drop):
        found = []
        for layer in (c for c in layers if c not in dropped):
            found.append((_kl(adapter, ids, dense, depth_masks(parent, dropped + [layer])), layer))
            bar.update(1)
        kl, layer = min(found)
        dropped.append(layer)
        trace.append(round(kl, 5))
    bar.close()
    return dropped, trace


def _kl(adapter, ids, dense, masks) -> float:
    """Mean KL(dense || masked) of the next-token distributions over every calibration position."""
    from compress.distill.loss import kl_rows, logit_chunks

    device = ids[0].device
    heads, filters = ([m.to(d) for m, d in zip(ms, devs)]
                      for ms, devs in zip(masks, (adapter.head_devices(), adapter.filter_devices())))
    total, count = 0.0, 0
    for x, t_hidden in zip(ids, dense):
        with adapter.masks(heads, filters), autocast(device):
            s_hidden = adapter.final_hidden(x).flatten(0, 1)
        for _, s, t in logit_chunks(adapter, adapter, s_hidden, t_hidden.flatten(0, 1)):
            total += float(kl_rows(s, t).sum())
        count += len(s_hidden)
    return total / count

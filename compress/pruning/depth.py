"""Depth pruning of a decoder: whole layers removed, chosen by block influence (ShortGPT, Men et al. 2024).

A layer's block influence is 1 - cos(x_in, x_out) of the residual stream entering and leaving it, averaged over
the calibration tokens: a layer that barely turns the stream matters little. The `drop_layers` layers of lowest
influence get all-zero head and filter masks; slimming then leaves them with 0 heads and 0 filters. With Gemma's
sandwich norms such a layer is the identity on the residual stream (each branch adds post_norm(0) = 0, since
Gemma has no attention or MLP bias), so the runtime skips it (serve.models.gemma) and a model with half its
layers dropped costs about half the layer time per decode step. Layers already empty do not count and are
never chosen again.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from compress.errors import UserError


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


def layers_to_drop(influence: torch.Tensor, num_drop: int, parent) -> list[int]:
    """The `num_drop` layers of lowest influence among those not already empty, in layer order."""
    candidates = [i for i in range(len(influence)) if i not in empty_layers(parent)]
    if not 0 < num_drop < len(candidates):
        raise UserError(f"cannot drop {num_drop} of the {len(candidates)} non-empty layers (keep at least one)")
    ranked = sorted(candidates, key=lambda i: float(influence[i]))
    return sorted(ranked[:num_drop])


def depth_masks(parent, dropped: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Head and filter masks: zeros on the dropped layers, ones elsewhere."""
    heads = [torch.full((h,), 0.0 if i in dropped else 1.0) for i, h in enumerate(parent[0])]
    filters = [torch.full((f,), 0.0 if i in dropped else 1.0) for i, f in enumerate(parent[2])]
    return heads, filters

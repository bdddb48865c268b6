"""Physical slimming: turn (possibly real-valued) masks into a smaller dense model.

Heads and filters whose mask is 0 are removed from the weights (Q/K/V rows, O columns, FFN input
rows, FFN output columns); the mask value of each kept unit is folded into its output-projection
columns, so the slimmed model computes exactly what the masked model computed. Layers left with
0 heads or 0 filters keep only their output-projection bias. FFN widths can be padded to a multiple of
8 with zero filters (exactly the same outputs) so that the GEMMs stay on the tensor-core fast path. The per-layer shapes are written into
the model config (`num_attention_heads_per_layer`, `intermediate_size_per_layer`).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def slim_model(adapter, head_masks, filter_masks, filter_multiple: int = 1) -> list[int]:
    """Slim `adapter.model` in place to the nonzero entries of the masks, folding their values.

    `filter_multiple` > 1 pads each nonzero FFN width up to a multiple of it with zero filters (same
    outputs, faster GEMMs). Returns the zero filters added per layer."""
    padded = []
    for layer, (hm, fm) in enumerate(zip(head_masks, filter_masks)):
        hm, fm = torch.as_tensor(hm).float().cpu(), torch.as_tensor(fm).float().cpu()
        padded.append(adapter.slim_layer(layer, hm.nonzero().flatten(), fm.nonzero().flatten(), hm, fm,
                                         filter_multiple=filter_multiple))
    adapter.record_shapes()
    return padded

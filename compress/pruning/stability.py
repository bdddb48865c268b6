"""How stable a selection is: the overlap of the units two masks keep (e.g. from two calibration draws).

For heads and for filters separately: |kept by both| / |kept by the first|, summed over layers (a unit is
kept where its mask is nonzero). 1.0 means the two draws keep the same units; for masks that keep a
fraction f of the units at random the expected overlap is about f.
"""

from __future__ import annotations

import torch


def kept_overlap(masks_a: tuple[list, list], masks_b: tuple[list, list]) -> dict:
    """{"heads": overlap, "filters": overlap} of two `(heads, filters)` mask pairs of the same model."""
    return {kind: _overlap(a, b) for kind, a, b in zip(("heads", "filters"), masks_a, masks_b)}


def _overlap(a: list, b: list) -> float:
    kept = sum(int((torch.as_tensor(x) != 0).sum()) for x in a)
    both = sum(int(((torch.as_tensor(x) != 0) & (torch.as_tensor(y) != 0)).sum()) for x, y in zip(a, b))
    return both / kept if kept else 1.0

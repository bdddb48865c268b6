"""Token-budget batches: inputs sorted by length, cut where the padded batch would pass the budget.

Sorting first keeps the padding small (neighbours in a batch have nearly the same length), and the
budget is on padded tokens (batch size x longest input), which is what a forward costs. The widest
input comes first in each batch, so adding an input never widens it. Shapes: `collate` gives
`input_ids`, `attention_mask` (and `token_type_ids` when the model takes them), all `[B, S]`.
"""

from __future__ import annotations

import torch


def plan(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped into batches of at most `max_tokens` padded tokens, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def collate(token_ids: list[list[int]], pad_id: int, with_token_types: bool, device) -> dict[str, torch.Tensor]:
    """Right-padded `[B, S]` tensors of one batch, on `device`."""
    width = max(len(ids) for ids in token_ids)
    ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, seq in enumerate(token_ids):
        ids[row, :len(seq)] = torch.as_tensor(seq)
        mask[row, :len(seq)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if with_token_types:
        batch["token_type_ids"] = torch.zeros_like(ids)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    """Tokens the batches run, padding included."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)

"""Tokenization and dynamically padded batches for sequence classification and regression.

A batch is a dict of tensors: `input_ids`, `attention_mask` (and `token_type_ids` when the tokenizer
makes them), all `[B, S]` with S the longest example of the batch, plus `labels` `[B]` (int64 for
classification, float32 for regression).
"""

from __future__ import annotations

import random
from typing import Iterator

import torch


def encode(tokenizer, examples, max_seq_length: int) -> list[dict]:
    """Tokenize `(text_a, text_b, label)` examples, truncated to `max_seq_length` tokens."""
    a = [e[0] for e in examples]
    b = [e[1] for e in examples] if examples and examples[0][1] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_seq_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [dict({k: enc[k][i] for k in keys}, labels=e[2]) for i, e in enumerate(examples)]


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in features)
    batch = {}
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        if key in features[0]:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features])
    labels = [f["labels"] for f in features]
    dtype = torch.float32 if isinstance(labels[0], float) else torch.long
    batch["labels"] = torch.tensor(labels, dtype=dtype)
    return batch


def batches(features: list[dict], batch_size: int, pad_id: int, shuffle: bool = False,
            seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    order = list(range(len(features)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([features[i] for i in order[start:start + batch_size]], pad_id)


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def mean_length(features: list[dict]) -> float:
    """Mean tokenized length: the sequence length the FLOPs cost model is evaluated at."""
    return sum(len(f["input_ids"]) for f in features) / max(len(features), 1)


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

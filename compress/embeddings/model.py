"""`Embedder`: an encoder and its pooling, token ids in, one embedding per text out.

The encoder is the bare Hugging Face model of any checkpoint of the BERT family (a task head, when there
is one, is left aside): dense or slimmed, as `compress.load` builds it. Shapes: input_ids `[B, S]` ->
`[B, D]` float32 (normalised when the pooling config says so).
"""

from __future__ import annotations

import torch
from torch import nn

from compress.embeddings.pooling import Pooling, read_pooling

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
POSITION_OFFSET = {"roberta": 2, "mpnet": 2}  # positions start after the padding index (pad id 1)


class Embedder(nn.Module):
    def __init__(self, encoder: nn.Module, pooling: Pooling):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling

    @property
    def config(self):
        return self.encoder.config

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **unused) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask, **extra).last_hidden_state
        return self.pooling.pool(hidden, mask)


def max_length(config, pooling: Pooling) -> int:
    """Tokens one input may have: the position table's length, or sentence-transformers' limit if lower."""
    positions = config.max_position_embeddings - POSITION_OFFSET.get(config.model_type, 0)
    return min(positions, pooling.max_seq_length or positions)


def load_embedder(path, device="cpu") -> tuple[Embedder, object]:
    """(Embedder, tokenizer) of the encoder in `path` (a name, hub id or directory)."""
    from compress.models import checkpoint

    local = checkpoint.resolve(path)
    model = checkpoint.load(local, device, allow_base=True)
    return Embedder(model.base_model, read_pooling(local)).eval(), checkpoint.load_tokenizer(local)


def model_inputs(batch: dict) -> dict:
    """The keys of a batch that an encoder takes (labels and the rest left out)."""
    return {k: v for k, v in batch.items() if k in INPUT_KEYS}

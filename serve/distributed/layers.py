"""One rank's share of the Gemma model: the runtime's own modules with the collectives added.

Column-parallel q/k/v and gate/up need nothing new: each rank's model is the ordinary GemmaForCausalLM
built from its shard spec (serve/distributed/split.py), so its projections are already the slices.
Row-parallel o_proj and down_proj sum partial products with one all-reduce each; a layer with no heads
(or no filters) on any rank skips it, and its bias, if any, is then added by every rank alike, otherwise
by rank 0 alone. The embedding and LM head are vocabulary-parallel: each rank holds `vocab_chunk` rows
(zero-padded on the last ranks); an embedding row comes from the rank that owns the id (all-reduce of
one non-zero term: exact), and logits are all-gathered and trimmed to the vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from serve.distributed.split import LayerShard, vocab_chunk, vocab_range
from serve.models.gemma import GemmaForCausalLM
from serve.models.gemma_config import GemmaSpec


class RowParallelLinear(nn.Linear):
    """nn.Linear over this rank's input columns whose output is summed over the ranks."""

    reduce = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.reduce:
            dist.all_reduce(y)
        return y


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding over the ids [start, start + num_real) of this rank; rows of other ids are summed in."""

    start, num_real = 0, 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_real)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside[:, None], 0)
        dist.all_reduce(x)
        return x


class TensorParallelGemma(GemmaForCausalLM):
    """GemmaForCausalLM of one rank's shard; logits are gathered from every rank."""

    def __init__(self, local_spec: GemmaSpec, full_vocab: int, world: int, rank: int):
        super().__init__(local_spec)
        self.full_vocab, self.world = full_vocab, world
        # every rank runs every layer: one whose local share is empty still joins its layers' all-reduces
        self.layer_ids = list(range(local_spec.num_hidden_layers))
        embed = self.model.embed_tokens
        embed.__class__ = VocabParallelEmbedding
        rows = vocab_range(full_vocab, world, rank)
        embed.start, embed.num_real = rows.start, len(rows)
        for layer in self.model.layers:
            layer.self_attn.o_proj.__class__ = RowParallelLinear
            layer.mlp.down_proj.__class__ = RowParallelLinear

    def set_reductions(self, shards: list[LayerShard]) -> None:
        for layer, shard in zip(self.model.layers, shards):
            layer.self_attn.o_proj.reduce = shard.attn_reduced
            layer.mlp.down_proj.reduce = shard.mlp_reduced

    def fuse(self, max_model_len: int) -> None:
        raise ValueError("the fast path (fused kernels, CUDA graphs) does not run tensor-parallel yet")

    def compute_logits(self, hidden: torch.Tensor, argmax_out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, hidden] -> fp32 logits [N, full vocab] on every rank (soft-capped)."""
        weight = self.lm_head.weight if hasattr(self, "lm_head") else self.model.embed_tokens.weight
        local = F.linear(hidden, weight).float()                        # [N, vocab_chunk]
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous())
        logits = torch.cat(parts, dim=1)[:, :self.full_vocab]
        cap = self.spec.final_logit_softcapping
        logits = logits if cap is None else cap * torch.tanh(logits / cap)
        if argmax_out is not None:
            torch.argmax(logits, dim=1, out=argmax_out)
        return logits


def _head_span(heads: list[int], head_dim: int) -> slice:
    """Rows of contiguous heads (split.py keeps a rank's heads contiguous)."""
    if not heads:
        return slice(0, 0)
    assert heads == list(range(heads[0], heads[-1] + 1)), heads
    return slice(heads[0] * head_dim, (heads[-1] + 1) * head_dim)


def shard_tensor(name: str, tensor, shards: list[LayerShard], spec: GemmaSpec, world: int, rank: int) -> torch.Tensor:
    """The slice of a full-model tensor (HF name) that `rank` holds. `tensor`: a tensor, or a safetensors
    slice (then only the rank's part is read from disk)."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = vocab_range(spec.vocab_size, world, rank)
        return F.pad(tensor[rows.start:rows.stop], (0, 0, 0, vocab_chunk(spec.vocab_size, world) - len(rows)))
    if not name.startswith("model.layers."):
        return tensor[:]
    layer, part = name[len("model.layers."):].split(".", 1)
    shard, d = shards[int(layer)], spec.head_dim
    filters = slice(shard.filters.start, shard.filters.stop)
    if part.startswith("self_attn.q_proj."):
        return tensor[_head_span(shard.heads, d)]
    if part.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
        return tensor[_head_span(shard.kv_heads, d)]
    if part == "self_attn.o_proj.weight":
        return tensor[:, _head_span(shard.heads, d)]
    if part.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
        return tensor[filters]
    if part == "mlp.down_proj.weight":
        return tensor[:, filters]
    if part == "self_attn.o_proj.bias" and shard.attn_reduced and rank > 0:
        return torch.zeros_like(tensor[:])       # rank 0 adds the bias once
    return tensor[:]

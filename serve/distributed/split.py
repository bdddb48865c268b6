"""How a model is split over N tensor-parallel ranks: pure functions from shapes to each rank's slice.

Attention splits by KV group (one KV head and the query heads that read it), so every rank's query
heads share its KV heads at one ratio. With at least N KV heads the groups go to the ranks as evenly as
they go; with fewer, the ranks go to the groups as evenly as they go and each rank keeps its group's KV
head (replicated) with a share of that group's query heads (a share may be 0: that rank then has no
attention in the layer). Filters (the MLP's intermediate width) and the vocabulary split into contiguous
ranges, the first ranks taking one more where the count does not divide. Rank 0 always holds at least
one head of a layer that has any, so its KV groups are every rank's (its block plan serves them all).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from serve.models.gemma_config import GemmaSpec


def even_ranges(total: int, parts: int) -> list[range]:
    """`total` items in `parts` contiguous ranges, sizes differing by at most one (the first larger)."""
    base, extra = divmod(total, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + base + (part < extra))
    return [range(bounds[p], bounds[p + 1]) for p in range(parts)]


@dataclass(frozen=True)
class LayerShard:
    """One rank's part of one layer, as global indices."""
    heads: list[int]          # query heads
    kv_heads: list[int]       # KV heads those query heads read
    filters: range            # intermediate (gate/up rows, down columns)
    attn_reduced: bool        # the layer has heads anywhere: o_proj's partial sums are all-reduced
    mlp_reduced: bool         # the layer has filters anywhere: down_proj's partial sums are all-reduced


def split_heads(num_heads: int, num_kv_heads: int, world: int, rank: int) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) of `rank`; see the module docstring."""
    if num_heads == 0:
        return [], []
    group = num_heads // num_kv_heads
    if num_kv_heads >= world:
        kv = list(even_ranges(num_kv_heads, world)[rank])
        return [h for k in kv for h in range(k * group, (k + 1) * group)], kv
    kv_head = next(k for k, ranks in enumerate(even_ranges(world, num_kv_heads)) if rank in ranks)
    ranks = even_ranges(world, num_kv_heads)[kv_head]
    share = even_ranges(group, len(ranks))[rank - ranks.start]
    heads = [kv_head * group + h for h in share]
    return heads, [kv_head] if heads else []


def split_layer(num_heads: int, num_kv_heads: int, num_filters: int, world: int, rank: int) -> LayerShard:
    heads, kv_heads = split_heads(num_heads, num_kv_heads, world, rank)
    return LayerShard(heads, kv_heads, even_ranges(num_filters, world)[rank], num_heads > 0, num_filters > 0)


def vocab_chunk(vocab_size: int, world: int) -> int:
    """Rows of each rank's embedding / LM-head shard: equal on every rank (padded) so logits all-gather."""
    return -(-vocab_size // world)


def vocab_range(vocab_size: int, world: int, rank: int) -> range:
    chunk = vocab_chunk(vocab_size, world)
    return range(min(rank * chunk, vocab_size), min((rank + 1) * chunk, vocab_size))


def split_model(spec: GemmaSpec, world: int, rank: int) -> list[LayerShard]:
    return [split_layer(hq, hkv, f, world, rank) for hq, hkv, f in
            zip(spec.num_attention_heads, spec.num_key_value_heads, spec.intermediate_size)]


def shard_spec(spec: GemmaSpec, shards: list[LayerShard], world: int) -> GemmaSpec:
    """The spec of one rank's model: its per-layer counts, its (padded) vocabulary shard."""
    return replace(spec, vocab_size=vocab_chunk(spec.vocab_size, world),
                   num_attention_heads=[len(s.heads) for s in shards],
                   num_key_value_heads=[len(s.kv_heads) for s in shards],
                   intermediate_size=[len(s.filters) for s in shards])


def check_split(spec: GemmaSpec, world: int) -> None:
    """ValueError for a split this runtime cannot serve."""
    if world < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {world}")
    if world > spec.vocab_size:
        raise ValueError(f"tensor_parallel_size={world} is larger than the vocabulary ({spec.vocab_size})")

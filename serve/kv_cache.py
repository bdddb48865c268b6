"""KV cache allocation: how many blocks each KV group gets, and the cache tensors of every layer.

Groups are keyed by attention span (None = full, int = sliding window). Within a group, layers with the
same KV width share one stacked tensor `[num_layers, 2, num_blocks, block_size, Hkv, D]`; each layer
gets views `(k_cache, v_cache)` of `[num_blocks, block_size, Hkv, D]`. Layers with 0 KV heads get None.
Memory: a sliding group never needs more blocks than its window (plus one step's chunk) per sequence,
so it is capped there and the rest of the budget goes to full-attention groups. How many bytes the
cache may take is serve/memory.py's business.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from serve.config import EngineConfig
from serve.models.gemma_config import GemmaSpec


def group_layers(spec: GemmaSpec) -> dict[int | None, list[int]]:
    groups = defaultdict(list)
    for i, (window, hkv) in enumerate(zip(spec.sliding_windows, spec.num_key_value_heads)):
        if hkv > 0:
            groups[window].append(i)
    return dict(groups)


def blocks_per_seq(key, config: EngineConfig, max_model_len: int) -> int:
    """Most blocks one sequence of this group holds at once."""
    full = math.ceil(max_model_len / config.block_size)
    if key is None:
        return full
    span = key - 1 + config.max_num_batched_tokens
    return min(full, math.ceil(span / config.block_size) + 1)


def bytes_per_block(spec: GemmaSpec, layers: list[int], config: EngineConfig, dtype: torch.dtype) -> int:
    width = sum(spec.num_key_value_heads[i] for i in layers) * spec.head_dim
    return 2 * config.block_size * width * torch.finfo(dtype).bits // 8


def plan_blocks(spec, config: EngineConfig, max_model_len: int, dtype, budget: int | None) -> dict[int | None, int]:
    """Blocks per group: the override, or `budget` bytes (serve/memory.py) split so sliding groups stop
    at their cap."""
    groups = group_layers(spec)
    caps = {key: config.max_num_seqs * blocks_per_seq(key, config, max_model_len) for key in groups}
    if config.num_kv_blocks is not None:
        return {key: config.num_kv_blocks for key in groups}
    cost = {key: bytes_per_block(spec, layers, config, dtype) for key, layers in groups.items()}
    plan, open_keys = {}, set(groups)
    while open_keys:
        share = budget // max(sum(cost[k] for k in open_keys), 1)
        capped = {k for k in open_keys if caps[k] <= share}
        if not capped:
            plan.update({k: int(share) for k in open_keys})
            break
        for k in capped:
            plan[k] = caps[k]
            budget -= caps[k] * cost[k]
        open_keys -= capped
    return plan


class KVCacheTooSmall(ValueError):
    """The KV budget holds less than one sequence of max_model_len."""


def check_plan(plan: dict, config: EngineConfig, max_model_len: int) -> None:
    for key, num_blocks in plan.items():
        need = blocks_per_seq(key, config, max_model_len)
        if num_blocks < need:
            kind = "full-attention" if key is None else f"sliding-window ({key})"
            raise KVCacheTooSmall(f"the KV cache of the {kind} layers holds {num_blocks} blocks, one sequence of "
                             f"max_model_len={max_model_len} needs {need}; lower --max-model-len or raise "
                             f"--kv-cache-memory")


def allocate_caches(spec: GemmaSpec, plan: dict, config: EngineConfig, dtype, device) -> tuple[list, dict]:
    """Per-layer (k_cache, v_cache) views (None for 0-KV-head layers) and the stacked tensors per group."""
    caches: list = [None] * spec.num_hidden_layers
    stacks = defaultdict(list)     # group key -> [(tensor, layer ids)]
    for key, layers in group_layers(spec).items():
        by_width = defaultdict(list)
        for i in layers:
            by_width[spec.num_key_value_heads[i]].append(i)
        for hkv, ids in by_width.items():
            shape = (len(ids), 2, plan[key], config.block_size, hkv, spec.head_dim)
            tensor = torch.zeros(shape, dtype=dtype, device=device)
            stacks[key].append(tensor)
            for j, i in enumerate(ids):
                caches[i] = (tensor[j, 0], tensor[j, 1])
    return caches, dict(stacks)

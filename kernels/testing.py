"""Random paged-attention problems for tests and benchmarks, built so that wrong reads show up.

Every cache slot that no sequence owns holds NaN, and so does every block a sliding window has left
behind: a kernel that loads one (instead of skipping it) turns its output into NaN even if it masks the
score, because 0 * NaN is NaN in the P @ V product. Block tables are shuffled so logical order never
matches physical order, and `first_block` pushes the used blocks high to exercise int64 offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedProblem:
    q: torch.Tensor              # [T, Hq, D] packed queries (decode: T == B)
    k_cache: torch.Tensor        # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor   # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor   # [B + 1] int32
    seq_lens: torch.Tensor       # [B] int32, context including the new query tokens
    max_seqlen_q: int


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere gives inf so it can never pass."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _block_tables(num_blocks_each, max_blocks, first_block, generator, device):
    total = sum(num_blocks_each)
    physical = first_block + torch.randperm(total, generator=generator)
    tables = torch.zeros(len(num_blocks_each), max_blocks, dtype=torch.int32)
    used = 0
    for b, n in enumerate(num_blocks_each):
        tables[b, :n] = physical[used:used + n].int()
        used += n
    return tables.to(device), first_block + total


def _stale_window_entries(tables, seq_lens, q_lens, block_size, window, stale_block):
    """Point blocks wholly before every query's window at a NaN block, as a freed block would be."""
    if window is None:
        return
    for b, (length, q_len) in enumerate(zip(seq_lens, q_lens)):
        first_visible = max(0, length - q_len - window + 1)
        tables[b, : first_visible // block_size] = stale_block


def make_paged_problem(context_lens, q_lens, *, num_heads: int, num_kv_heads: int, head_dim: int,
                       block_size: int = 16, sliding_window=None, dtype=torch.bfloat16,
                       device="cpu", first_block: int = 0, seed: int = 0) -> PagedProblem:
    """Sequences with context_lens[b] cached tokens before q_lens[b] new query tokens (all in cache)."""
    generator = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(context_lens, q_lens)]
    blocks_each = [-(-length // block_size) for length in seq_lens]
    max_blocks = max(blocks_each) + 1
    tables, end = _block_tables(blocks_each, max_blocks, first_block, generator, device)
    num_blocks = end + 1  # the last block is the stale one, all NaN
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    for b, length in enumerate(seq_lens):
        positions = torch.arange(length, device=device)
        blocks = tables[b, positions // block_size].long()
        kv_shape = (length, num_kv_heads, head_dim)
        k_cache[blocks, positions % block_size] = torch.randn(kv_shape, generator=generator).to(device, dtype)
        v_cache[blocks, positions % block_size] = torch.randn(kv_shape, generator=generator).to(device, dtype)
    _stale_window_entries(tables, seq_lens, q_lens, block_size, sliding_window, end)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=generator).to(device, dtype)
    cu = torch.tensor([0] + list(q_lens), dtype=torch.int32).cumsum(0).int().to(device)
    return PagedProblem(q, k_cache, v_cache, tables, cu,
                        torch.tensor(seq_lens, dtype=torch.int32, device=device), max(q_lens))

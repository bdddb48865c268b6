"""Paged decode attention: one new query token per sequence, split-KV then a reduction (flash-decoding).

Grid of the split kernel: (batch, kv_head, split). A program loads the query heads that share one KV
head (GQA group, padded to 16 rows for the matrix unit) so each KV tile is read once for the whole
group, walks its share of the context in tiles of BLOCK_N tokens (each token finds its physical block
through the block table), and keeps an online softmax in log2 units. The visible context starts at
`seq_len - window` under a sliding window: tiles before it are never visited and their block-table
entries (possibly stale) never loaded. With several splits, each writes its normalized partial output
and log-sum-exp; the reduction kernel (grid (batch, q_head)) merges them. With one split the kernel
writes the final output directly. (An in-kernel merge by the last split, saving the reduce launch, was
measured slower on the H100 and removed; docs/kernels.md.)

Under PDL (kernels/common.py) the split kernel reads seq_lens and the block tables, and the block
numbers of its first tile, before its wait: they are the step's metadata, which the kernel launched
just before never writes (the engine copies them in before a step's first kernel).

Shapes: q/out [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
seq_lens [B] int32 (includes the new token, already in the cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import device_sms, dot_upcast, next_pow2, pdl_launch, pdl_wait, scores_to_log2
from .options import DecodeConfig, kernel_options

# Launch parameters; `set_options(decode_config=...)` overrides them for tuning sweeps
# (evals/bench_kernels.py --sweep, evals/lab/bench_batch1.py --decode-config).
# Measured on an H100 (docs/kernels.md): BLOCK_N 32 with 3 stages beat 64 with 2 by 2.5%.
DECODE_CONFIG = DecodeConfig(block_n=32, num_warps=4, num_stages=3, programs_per_sm=2.0)
# Batch 1 (one sequence spread over many splits, each with a few tiles): smaller tiles and two stages give
# more splits with less prologue; 5.6 against 6.4 us per layer of the Gemma-2-2B chain (docs/kernels.md).
BATCH1_DECODE_CONFIG = DecodeConfig(block_n=16, num_warps=4, num_stages=2, programs_per_sm=2.0)
MAX_SPLITS = 64


@triton.jit(do_not_specialize=["stride_bt_b"])  # block-table width varies per step (see prefill.py)
def paged_decode_split_kernel(
    q_ptr,                       # [B, Hq, D]
    k_cache_ptr, v_cache_ptr,    # [num_blocks, BLOCK_SIZE, Hkv, D]
    block_tables_ptr,            # [B, max_blocks] int32
    seq_lens_ptr,                # [B] int32
    part_out_ptr,                # [B, Hq, NUM_SPLITS, D] fp32 (unused when NUM_SPLITS == 1)
    part_lse_ptr,                # [B, Hq, NUM_SPLITS] fp32, log2 units
    out_ptr,                     # [B, Hq, D] (written only when NUM_SPLITS == 1)
    qk_scale, softcap, window,
    stride_q_b, stride_q_h,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    stride_bt_b,
    stride_po_b, stride_po_h, stride_po_s,
    stride_pl_b, stride_pl_h,
    stride_out_b, stride_out_h,
    QUERIES_PER_KV: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # The step's metadata (seq_lens, block tables) is read before the PDL wait, while the rotary kernel
    # still runs: no kernel of the step writes it (module docstring). So are the block numbers of this
    # split's first tile, two dependent loads that would otherwise open the critical path.
    seq_len = tl.load(seq_lens_ptr + b, cache_modifier=".cg")
    first = 0
    if USE_WINDOW:
        first = tl.maximum(seq_len - window, 0)
    num_tiles = tl.cdiv(seq_len - first, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    pos_lo = first + tile_lo * BLOCK_N + tl.arange(0, BLOCK_N)
    blocks_lo = tl.load(block_tables_ptr + b.to(tl.int64) * stride_bt_b + pos_lo // BLOCK_SIZE,
                        mask=(pos_lo < seq_len) & (pos_lo < first + tile_hi * BLOCK_N), other=0,
                        cache_modifier=".cg")
    pdl_wait(USE_PDL)            # q and the new token's KV come from the previous kernel

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * QUERIES_PER_KV + g
    row_mask = g < QUERIES_PER_KV
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_q_b + heads[:, None] * stride_q_h + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], -1.0e38, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt_b
    for tile in range(tile_lo, tile_hi):
        pos = first + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = pos < seq_len
        later = pos >= first + (tile_lo + 1) * BLOCK_N       # not the first tile, whose blocks are loaded
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid & later, other=0)
        block = tl.where(later, block, blocks_lo).to(tl.int64)
        slot = pos % BLOCK_SIZE
        kv_mask = valid[:, None] & d_mask[None, :]
        k_off = block * stride_kc_block + slot * stride_kc_slot + kv_head * stride_kc_head
        k = tl.load(k_cache_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v_off = block * stride_vc_block + slot * stride_vc_slot + kv_head * stride_vc_head
        v = tl.load(v_cache_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = scores_to_log2(tl.dot(q, tl.trans(k)), qk_scale, softcap, USE_SOFTCAP)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    nonempty = l_i > 0.0
    acc = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    out_mask = row_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        dst = out_ptr + b.to(tl.int64) * stride_out_b + heads[:, None] * stride_out_h + d[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        part = part_out_ptr + b.to(tl.int64) * stride_po_b + heads * stride_po_h + split * stride_po_s
        tl.store(part[:, None] + d[None, :], acc, mask=out_mask)
        tl.store(part_lse_ptr + b * stride_pl_b + heads * stride_pl_h + split, lse, mask=row_mask)


@triton.jit
def paged_decode_reduce_kernel(
    part_out_ptr,                # [B, Hq, NUM_SPLITS, D] fp32
    part_lse_ptr,                # [B, Hq, NUM_SPLITS] fp32, log2 units
    out_ptr,                     # [B, Hq, D]
    seq_lens_ptr,                # [B] int32
    window,
    stride_po_b, stride_po_h, stride_po_s,
    stride_pl_b, stride_pl_h,
    stride_out_b, stride_out_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, USE_WINDOW: tl.constexpr, USE_PDL: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    # Which splits had tiles follows from seq_len (metadata: read before the wait) as in the split
    # kernel; the rest wrote lse -inf and zeros, and are not read at all.
    seq_len = tl.load(seq_lens_ptr + b, cache_modifier=".cg")
    first = 0
    if USE_WINDOW:
        first = tl.maximum(seq_len - window, 0)
    num_tiles = tl.cdiv(seq_len - first, BLOCK_N)
    active = tl.cdiv(num_tiles, tl.cdiv(num_tiles, NUM_SPLITS))
    pdl_wait(USE_PDL)            # the partials are the split kernel's output
    s = tl.arange(0, BLOCK_S)
    s_mask = s < active
    # partials and their lse in one round trip: nothing loaded here waits on a reduction
    part = part_out_ptr + b.to(tl.int64) * stride_po_b + head * stride_po_h
    partial = tl.load(part + s[:, None] * stride_po_s + d[None, :],
                      mask=s_mask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    lse = tl.load(part_lse_ptr + b * stride_pl_b + head * stride_pl_h + s, mask=s_mask, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))  # inactive splits and empty ones carry -inf: weight 0
    merged = tl.sum(partial * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    dst = out_ptr + b.to(tl.int64) * stride_out_b + head * stride_out_h + d
    tl.store(dst, merged.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


REDUCE_BLOCK_D = 64   # head-dim columns per reduce program: a [splits, 64] fp32 tile in registers


def merge_splits(part_out, part_lse, seq_lens, out, *, sliding_window, block_n: int) -> None:
    """The reduction launch: out [B, Hq, D] from the split kernel's partials [B, Hq, splits, D] and lse
    [B, Hq, splits], reading only the splits that seq_lens (with the window, in tiles of block_n
    tokens) gave tiles to."""
    batch, num_heads, splits, head_dim = part_out.shape
    block_d = min(REDUCE_BLOCK_D, next_pow2(head_dim))
    paged_decode_reduce_kernel[(batch, num_heads, triton.cdiv(head_dim, block_d))](
        part_out, part_lse, out, seq_lens, int(sliding_window or 0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        NUM_SPLITS=splits, BLOCK_S=next_pow2(splits), USE_WINDOW=sliding_window is not None,
        **pdl_launch(out.device, batch),
    )


def decode_config(batch: int) -> DecodeConfig:
    """Launch parameters for a decode call of `batch` sequences; the options' decode_config wins."""
    override = kernel_options().decode_config
    if override is None:
        return BATCH1_DECODE_CONFIG if batch == 1 else DECODE_CONFIG
    return override


def choose_num_splits(q, k_cache, block_tables, sliding_window, block_n: int, per_sm: float) -> int:
    """Splits per (sequence, KV head) to fill the device, from shapes only (no host sync on seq_lens)."""
    batch, num_kv_heads = q.shape[0], k_cache.shape[2]
    max_context = block_tables.shape[1] * k_cache.shape[1]
    if sliding_window is not None:
        max_context = min(max_context, sliding_window)
    wanted = triton.cdiv(int(per_sm * device_sms(q)), batch * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(max_context, block_n), MAX_SPLITS))


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, *, scale: float,
                           sliding_window=None, softcap=None, out=None) -> torch.Tensor:
    """Attention of one new token per sequence q [B, Hq, D] over its paged context -> [B, Hq, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    config = decode_config(batch)
    group = num_heads // num_kv_heads
    splits = choose_num_splits(q, k_cache, block_tables, sliding_window, config.block_n,
                               config.programs_per_sm)
    part_out = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
    pdl = pdl_launch(q.device, batch)
    paged_decode_split_kernel[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part_out, part_lse, out,
        float(scale), float(softcap or 1.0), int(sliding_window or 0),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        QUERIES_PER_KV=group, BLOCK_G=max(16, next_pow2(group)),
        HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=config.block_n, NUM_SPLITS=splits,
        USE_SOFTCAP=softcap is not None, USE_WINDOW=sliding_window is not None,
        UPCAST=dot_upcast(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl,
    )
    if splits > 1:
        merge_splits(part_out, part_lse, seq_lens, out, sliding_window=sliding_window, block_n=config.block_n)
    return out

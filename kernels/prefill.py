"""Paged prefill attention: variable-length query chunks over paged KV that includes a cached prefix.

Grid: (query tile, sequence, kv_head). A program takes BLOCK_Q consecutive query tokens of one sequence
and the QUERIES_PER_KV query heads sharing one KV head, packed as BLOCK_M = BLOCK_Q * group rows
(row r = token r // group, head r % group), so each KV tile feeds the whole GQA group from one read.
Query i of sequence b sits at absolute position seq_lens[b] - q_len_b + i (the chunk is the tail of the
context). KV tiles run from the first position visible to the tile's first query (0, or pos - window + 1
under a sliding window) to the tile's last query: tiles wholly outside are never visited, so stale
block-table entries are never loaded; the causal/window mask trims the rest per element.

Shapes: q/out [T, Hq, D] (tokens of all sequences packed, cu_seqlens_q [B+1] int32 bounds them);
caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32; seq_lens [B] int32.
"""

from __future__ import annotations

import triton
import triton.language as tl

import torch

from kernels.common import dot_upcast, next_pow2, scores_to_log2


@triton.jit
def paged_prefill_kernel(
    q_ptr,                       # [T, Hq, D]
    k_cache_ptr, v_cache_ptr,    # [num_blocks, BLOCK_SIZE, Hkv, D]
    block_tables_ptr,            # [B, max_blocks] int32
    cu_seqlens_q_ptr,            # [B + 1] int32
    seq_lens_ptr,                # [B] int32
    out_ptr,                     # [T, Hq, D]
    qk_scale, softcap, window,
    stride_q_t, stride_q_h,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    stride_bt_b,
    stride_out_t, stride_out_h,
    QUERIES_PER_KV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
):
    q_tile = tl.program_id(0)
    b = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    token = q_tile * BLOCK_Q + rows // QUERIES_PER_KV
    heads = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_mask = (rows < BLOCK_Q * QUERIES_PER_KV) & (token < q_len)
    q_pos = context + token
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q_rows = (q_start + token).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_t + heads[:, None] * stride_q_h + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    kv_hi = tl.minimum(context + (q_tile + 1) * BLOCK_Q, seq_len)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(context + q_tile * BLOCK_Q - window + 1, 0)
    m_i = tl.full([BLOCK_M], -1.0e38, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt_b
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < kv_hi
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
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
        allowed = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (q_pos[:, None] - pos[None, :] < window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    dst = out_ptr + q_rows[:, None] * stride_out_t + heads[:, None] * stride_out_h + d[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def prefill_blocks(group: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N kv tokens, num_warps) sized so q, K, V tiles and acc fit on chip."""
    block_m = max(64 if head_dim > 128 else 128, next_pow2(group))
    block_n = 32 if head_dim > 128 else 64
    return block_m, block_n, 8 if head_dim > 128 else 4


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, *,
                            max_seqlen_q: int, scale: float, sliding_window=None, softcap=None,
                            out=None) -> torch.Tensor:
    """Causal attention of packed query chunks q [T, Hq, D] over paged KV -> [T, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q) if out is None else out
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    group = num_heads // num_kv_heads
    block_m, block_n, warps = prefill_blocks(group, head_dim)
    block_q = block_m // group
    grid = (triton.cdiv(max_seqlen_q, block_q), batch, num_kv_heads)
    paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out,
        float(scale), float(softcap or 1.0), int(sliding_window or 0),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        QUERIES_PER_KV=group, BLOCK_Q=block_q, BLOCK_M=block_m,
        HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_N=block_n,
        USE_SOFTCAP=softcap is not None, USE_WINDOW=sliding_window is not None,
        UPCAST=dot_upcast(q.dtype), num_warps=warps, num_stages=2,
    )
    return out

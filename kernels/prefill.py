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

from .common import dot_upcast, next_pow2, scores_to_log2


@triton.jit
def prefill_tile(q, q_pos, m_i, l_i, acc, start, kv_hi, table, k_base, v_base, qk_scale, softcap,
                 window, stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot, d, d_mask,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                 USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, UPCAST: tl.constexpr):
    """One KV tile [start, start + BLOCK_N) of the online softmax; MASKED applies causal/window/length."""
    pos = start + tl.arange(0, BLOCK_N)
    valid = pos < kv_hi
    block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    slot = pos % BLOCK_SIZE
    kv_mask = valid[:, None] & d_mask[None, :]
    k_off = block * stride_kc_block + slot * stride_kc_slot
    k = tl.load(k_base + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v_off = block * stride_vc_block + slot * stride_vc_slot
    v = tl.load(v_base + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = scores_to_log2(tl.dot(q, tl.trans(k)), qk_scale, softcap, USE_SOFTCAP)
    if MASKED:
        allowed = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (q_pos[:, None] - pos[None, :] < window)
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


# The block-table width changes from step to step; specialising on it (divisible by 16 or not) compiled a
# second multi-second variant in the middle of a serving run, so it stays a plain runtime integer.
@triton.jit(do_not_specialize=["stride_bt_b"])
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
    k_base = k_cache_ptr + kv_head * stride_kc_head
    v_base = v_cache_ptr + kv_head * stride_vc_head
    # Tiles every row sees whole (past the window's trailing edge for the tile's last query, at or
    # before its first query) skip the per-element mask: most tiles of a long prefill.
    first_q = context + q_tile * BLOCK_Q
    full_from = kv_lo
    if USE_WINDOW:
        last_q = kv_hi - 1
        full_from = tl.maximum(kv_lo, last_q - window + 1)
    full_lo = kv_lo + tl.cdiv(full_from - kv_lo, BLOCK_N) * BLOCK_N
    full_hi = full_lo + tl.maximum(first_q + 1 - full_lo, 0) // BLOCK_N * BLOCK_N
    full_hi = tl.maximum(full_hi, full_lo)
    for start in range(kv_lo, tl.minimum(full_lo, kv_hi), BLOCK_N):
        m_i, l_i, acc = prefill_tile(
            q, q_pos, m_i, l_i, acc, start, kv_hi, table, k_base, v_base, qk_scale, softcap, window,
            stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot, d, d_mask,
            BLOCK_SIZE, BLOCK_N, True, USE_SOFTCAP, USE_WINDOW, UPCAST)
    for start in range(full_lo, full_hi, BLOCK_N):
        m_i, l_i, acc = prefill_tile(
            q, q_pos, m_i, l_i, acc, start, kv_hi, table, k_base, v_base, qk_scale, softcap, window,
            stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot, d, d_mask,
            BLOCK_SIZE, BLOCK_N, False, USE_SOFTCAP, USE_WINDOW, UPCAST)
    for start in range(tl.maximum(full_hi, full_lo), kv_hi, BLOCK_N):
        m_i, l_i, acc = prefill_tile(
            q, q_pos, m_i, l_i, acc, start, kv_hi, table, k_base, v_base, qk_scale, softcap, window,
            stride_kc_block, stride_kc_slot, stride_vc_block, stride_vc_slot, d, d_mask,
            BLOCK_SIZE, BLOCK_N, True, USE_SOFTCAP, USE_WINDOW, UPCAST)

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    dst = out_ptr + q_rows[:, None] * stride_out_t + heads[:, None] * stride_out_h + d[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


# (BLOCK_M rows, BLOCK_N kv tokens, num_warps, num_stages) by head_dim; sized so the q, K, V tiles and
# the fp32 accumulator fit on chip. evals/bench_kernels.py --sweep times alternatives.
PREFILL_CONFIG = {128: (128, 128, 8, 2), 256: (128, 64, 8, 2)}  # best of the H100 sweep


def prefill_blocks(group: int, head_dim: int) -> tuple[int, int, int, int]:
    block_m, block_n, warps, stages = PREFILL_CONFIG[128 if head_dim <= 128 else 256]
    return max(block_m, next_pow2(group)), block_n, warps, stages


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
    block_m, block_n, warps, stages = prefill_blocks(group, head_dim)
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
        UPCAST=dot_upcast(q.dtype), num_warps=warps, num_stages=stages,
    )
    return out

"""Fused Gemma RMSNorm (optionally with the residual add), the norm pair, and rotary embedding.

Norms run one row per program. RMSNorm follows Gemma: the residual sum is formed in the activation dtype (as Hugging Face adds the
residual stream), the norm runs in fp32 and multiplies by (1 + weight), then rounds once. Fusing the
add saves one read and one write of the hidden state per norm (Gemma has four norms per layer).
`rms_norm_pair` goes further: a branch's post-norm, the residual add and the following pre-norm in
one kernel (post-attention + pre-feedforward; post-feedforward + the next layer's input norm), so a
layer launches two norm kernels instead of four. Under PDL (kernels/common.py) the norm weights, and
a residual stream the caller says is settled, are loaded before waiting on the previous kernel.
`embed_rms_norm` starts a step: the embedding gather, Gemma's sqrt(hidden) scale and the first input norm.
Rotary is rotate-half (NeoX / Hugging Face) over the whole head: q, k [T, H, D] rotated in place from
a [max_position, D] fp32 table of cos (first D/2 columns) and sin (last D/2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import next_pow2, pdl_launch, pdl_wait


@triton.jit
def _gemma_norm(xf, weight, eps, HIDDEN: tl.constexpr):
    """fp32 row xf [BLOCK_H] -> xf / rms(xf) * (1 + weight), still fp32 (weight: fp32 [BLOCK_H])."""
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / HIDDEN + eps)
    return xf * rstd * (1.0 + weight)


@triton.jit
def rms_norm_kernel(
    x_ptr,                       # [T, H]
    residual_ptr,                # [T, H] (read when HAS_RESIDUAL)
    weight_ptr,                  # [H]
    out_ptr,                     # [T, H]
    sum_ptr,                     # [T, H] x + residual (written when HAS_RESIDUAL)
    eps,
    stride_x_t, stride_residual_t, stride_out_t, stride_sum_t,
    HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    mask = h < HIDDEN
    weight = tl.load(weight_ptr + h, mask=mask, other=0.0).to(tl.float32)
    pdl_wait(USE_PDL)            # x and the residual are earlier kernels' outputs
    x = tl.load(x_ptr + row * stride_x_t + h, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual_t + h, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum_t + h, x, mask=mask)
    out = _gemma_norm(x.to(tl.float32), weight, eps, HIDDEN)
    tl.store(out_ptr + row * stride_out_t + h, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_pair_kernel(
    x_ptr,                       # [T, H] a branch output
    residual_ptr,                # [T, H] the residual stream before the branch
    w1_ptr,                      # [H] the branch's post-norm
    w2_ptr,                      # [H] the next pre-norm
    out_ptr,                     # [T, H] norm2(norm1(x) + residual)
    sum_ptr,                     # [T, H] norm1(x) + residual, the new stream
    eps,
    stride_x_t, stride_residual_t, stride_out_t, stride_sum_t,
    HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, RESIDUAL_SETTLED: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    mask = h < HIDDEN
    dtype = x_ptr.dtype.element_ty
    w1 = tl.load(w1_ptr + h, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w2_ptr + h, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL_SETTLED:         # written before the kernel just before: complete by now (read from L2)
        residual = tl.load(residual_ptr + row * stride_residual_t + h, mask=mask, other=0.0, cache_modifier=".cg")
    pdl_wait(USE_PDL)            # x (and an unsettled residual) are earlier kernels' outputs
    x = tl.load(x_ptr + row * stride_x_t + h, mask=mask, other=0.0).to(tl.float32)
    if not RESIDUAL_SETTLED:
        residual = tl.load(residual_ptr + row * stride_residual_t + h, mask=mask, other=0.0)
    # round where the two separate norm calls would: norm1's output, then the residual sum
    normed = _gemma_norm(x, w1, eps, HIDDEN).to(dtype)
    summed = (normed.to(tl.float32) + residual.to(tl.float32)).to(dtype)
    tl.store(sum_ptr + row * stride_sum_t + h, summed, mask=mask)
    out = _gemma_norm(summed.to(tl.float32), w2, eps, HIDDEN)
    tl.store(out_ptr + row * stride_out_t + h, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_pair(x, w1, w2, eps: float, residual, residual_settled: bool = False):
    """(norm2(norm1(x) + residual), norm1(x) + residual) for x, residual [T, H]: Gemma 2's post-branch
    norm, residual add and the next pre-norm in one launch (two launches and one round trip saved).
    `residual_settled`: the residual was not written by the kernel launched just before this one (true
    of a layer's residual stream, which a branch of several kernels separates from the norm that wrote
    it), so under PDL it is loaded before the wait, while that kernel still runs (kernels/common.py)."""
    hidden = x.shape[-1]
    x2, res2 = x.reshape(-1, hidden), residual.reshape(-1, hidden)
    out, summed = torch.empty_like(x), torch.empty_like(x)
    out2, sum2 = out.view(-1, hidden), summed.view(-1, hidden)
    if x2.shape[0] > 0:
        rms_norm_pair_kernel[(x2.shape[0],)](
            x2, res2, w1, w2, out2, sum2, float(eps),
            x2.stride(0), res2.stride(0), out2.stride(0), sum2.stride(0),
            HIDDEN=hidden, BLOCK_H=next_pow2(hidden), RESIDUAL_SETTLED=residual_settled,
            num_warps=4 if hidden <= 4096 else 8, **pdl_launch(x.device, x2.shape[0]),
        )
    return out, summed


def rms_norm(x, weight, eps: float, residual=None, out=None):
    """Gemma RMSNorm of x [T, H] (or (norm(x + residual), x + residual) with a residual)."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    out = torch.empty_like(x) if out is None else out
    out2 = out.view(-1, hidden)
    summed = torch.empty_like(x) if residual is not None else out
    res2 = residual.reshape(-1, hidden) if residual is not None else x2
    sum2 = summed.view(-1, hidden)
    if x2.shape[0] > 0:
        rms_norm_kernel[(x2.shape[0],)](
            x2, res2, weight, out2, sum2, float(eps),
            x2.stride(0), res2.stride(0), out2.stride(0), sum2.stride(0),
            HIDDEN=hidden, BLOCK_H=next_pow2(hidden), HAS_RESIDUAL=residual is not None,
            num_warps=4 if hidden <= 4096 else 8, **pdl_launch(x.device, x2.shape[0]),
        )
    return out if residual is None else (out, summed)


@triton.jit
def embed_rms_norm_kernel(
    ids_ptr,                     # [T] token ids (int32 or int64)
    src_rows_ptr,                # [T] int32: >= 0 takes prev_tokens[src] instead (read when HAS_SRC)
    prev_ptr,                    # [*] int64 tokens sampled by the previous step
    table_ptr,                   # [V, H] embedding
    weight_ptr,                  # [H] the first layer's input norm
    out_ptr,                     # [T, H] norm(embedding * scale)
    sum_ptr,                     # [T, H] embedding * scale, the residual stream
    scale, eps,
    stride_table, stride_out_t, stride_sum_t,
    HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, HAS_SRC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    mask = h < HIDDEN
    dtype = table_ptr.dtype.element_ty
    token = tl.load(ids_ptr + row).to(tl.int64)
    if HAS_SRC:
        src = tl.load(src_rows_ptr + row)
        prev = tl.load(prev_ptr + tl.maximum(src, 0)).to(tl.int64)
        token = tl.where(src >= 0, prev, token)
    x = tl.load(table_ptr + token * stride_table + h, mask=mask, other=0.0)
    x = (x.to(tl.float32) * scale).to(dtype)           # rounded as the separate multiply rounds
    tl.store(sum_ptr + row * stride_sum_t + h, x, mask=mask)
    weight = tl.load(weight_ptr + h, mask=mask, other=0.0).to(tl.float32)
    out = _gemma_norm(x.to(tl.float32), weight, eps, HIDDEN)
    tl.store(out_ptr + row * stride_out_t + h, out.to(out_ptr.dtype.element_ty), mask=mask)


def embed_rms_norm(ids, table, scale: float, weight, eps: float, src_rows=None, prev_tokens=None):
    """(norm(table[ids] * scale), table[ids] * scale) [T, H] in one launch: a Gemma step's embedding, its
    sqrt(hidden) scale (`scale`, already rounded to the table's dtype) and the first input norm. With
    `src_rows` [T], a row whose entry is >= 0 embeds prev_tokens[src] instead of its id: a decode step
    launched ahead takes the previous step's tokens on the device (serve/lookahead.py). Not a PDL launch:
    it is the first kernel of a step, behind the metadata copy."""
    num_tokens, hidden = ids.shape[0], table.shape[1]
    out = table.new_empty(num_tokens, hidden)
    summed = torch.empty_like(out)
    if num_tokens > 0:
        has_src = src_rows is not None
        embed_rms_norm_kernel[(num_tokens,)](
            ids, src_rows if has_src else ids, prev_tokens if has_src else ids, table, weight, out, summed,
            float(scale), float(eps), table.stride(0), out.stride(0), summed.stride(0),
            HIDDEN=hidden, BLOCK_H=next_pow2(hidden), HAS_SRC=has_src, num_warps=4 if hidden <= 4096 else 8,
        )
    return out, summed


@triton.jit
def rotary_embedding_kernel(
    positions_ptr,               # [T] int64
    q_ptr,                       # [T, Hq, D], rotated in place
    k_ptr,                       # [T, Hkv, D], rotated in place
    cos_sin_ptr,                 # [max_position, D] fp32: cos | sin
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cs_p,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    heads = tl.arange(0, BLOCK_HEADS)
    i_mask = i < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs_p + i, mask=i_mask, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs_p + HALF + i, mask=i_mask, other=0.0)[None, :]
    for which in tl.static_range(2):
        if which == 0:
            base = q_ptr + token * stride_q_t + heads[:, None] * stride_q_h
            mask = (heads[:, None] < NUM_Q_HEADS) & i_mask[None, :]
        else:
            base = k_ptr + token * stride_k_t + heads[:, None] * stride_k_h
            mask = (heads[:, None] < NUM_K_HEADS) & i_mask[None, :]
        x1 = tl.load(base + i[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + i[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(base + i[None, :], (x1 * cos - x2 * sin).to(base.dtype.element_ty), mask=mask)
        tl.store(base + HALF + i[None, :], (x2 * cos + x1 * sin).to(base.dtype.element_ty), mask=mask)


def rotary_embedding(positions, q, k, cos_sin_cache):
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by their positions [T]; returns (q, k)."""
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return q, k
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("rotary_embedding needs the head dimension contiguous")
    half = head_dim // 2
    rotary_embedding_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=k.shape[1],
        BLOCK_HEADS=next_pow2(max(num_q_heads, k.shape[1])), HALF=half, BLOCK_HALF=next_pow2(half),
    )
    return q, k

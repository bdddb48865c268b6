"""Writing new keys and values into the paged KV cache (one program per token and head).

`reshape_and_cache` copies already-rotated k and v. `rotary_and_cache` is the fast path's fused form:
rotate-half RoPE (NeoX / Hugging Face, table [max_position, D] fp32 cos | sin) of q in place and of k
on its way into the cache, v copied beside it, and Gemma 3's per-head QK-norm first when given; grid
(token, Hq + Hkv), a head per program, so the norm's reduction stays inside one program. At batch-1
decode it replaces two launches (rotary_embedding, reshape_and_cache) and one round trip of k.

Cache layout `[num_blocks, block_size, num_kv_heads, head_dim]`; slot = block * block_size + offset;
slot -1 marks a token whose KV is not stored (padding, or a position a sliding window no longer needs).
Offsets are computed in int64: a large cache passes 2**31 elements.

Under PDL (kernels/common.py) `rotary_and_cache` reads positions, slots and the RoPE table before its
wait, while the kernel before it (the qkv product) still runs. That is safe because they are a step's
metadata, copied in before the step's first kernel, or constants: the contract is that the kernel
launched just before never writes them (the paged decode kernel reads seq_lens and block tables the
same way).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import next_pow2, pdl_launch, pdl_wait


@triton.jit
def reshape_and_cache_kernel(
    key_ptr, value_ptr,          # [T, Hkv, D]
    k_cache_ptr, v_cache_ptr,    # [num_blocks, block_size, Hkv, D]
    slot_mapping_ptr,            # [T] int64
    stride_key_t, stride_key_h, stride_value_t, stride_value_h,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = (d < HEAD_DIM) & (slot + d * 0 >= 0)  # slot -1: nothing stored (a vector mask, not a branch)
    slot = tl.maximum(slot, 0)
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    k = tl.load(key_ptr + token * stride_key_t + head * stride_key_h + d, mask=mask)
    v = tl.load(value_ptr + token * stride_value_t + head * stride_value_h + d, mask=mask)
    k_dst = k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot + head * stride_kc_head
    v_dst = v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot + head * stride_vc_head
    tl.store(k_dst + d, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst + d, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Write key/value [T, Hkv, D] into k_cache/v_cache at slot_mapping[T] (int64, -1 = skip)."""
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1 or value.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("reshape_and_cache needs the head dimension contiguous")
    reshape_and_cache_kernel[(num_tokens, num_heads)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim),
    )


@triton.jit
def _head_halves(base, i, mask, norm_ptr, eps, HALF: tl.constexpr, USE_QK_NORM: tl.constexpr):
    """Both halves of one head as fp32 [BLOCK_HALF], QK-normed first when USE_QK_NORM; the norm output is
    rounded to the input dtype, where the separate rms_norm launch rounded it."""
    x1 = tl.load(base + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + i, mask=mask, other=0.0).to(tl.float32)
    if USE_QK_NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
        w1 = tl.load(norm_ptr + i, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(norm_ptr + HALF + i, mask=mask, other=0.0).to(tl.float32)
        dtype = base.dtype.element_ty
        x1 = (x1 * rstd * (1.0 + w1)).to(dtype).to(tl.float32)
        x2 = (x2 * rstd * (1.0 + w2)).to(dtype).to(tl.float32)
    return x1, x2


@triton.jit
def rotary_and_cache_kernel(
    positions_ptr,               # [T] int64
    q_ptr,                       # [T, Hq, D], (normed and) rotated in place
    k_ptr, v_ptr,                # [T, Hkv, D], read only
    k_cache_ptr, v_cache_ptr,    # [num_blocks, block_size, Hkv, D]
    slot_mapping_ptr,            # [T] int64, -1 = skip
    cos_sin_ptr,                 # [max_position, D] fp32: cos | sin
    q_norm_ptr, k_norm_ptr,      # [D] (read when USE_QK_NORM)
    eps,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_cs_p,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    NUM_Q_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    USE_QK_NORM: tl.constexpr, USE_PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)                  # [0, Hq): a query head; [Hq, Hq + Hkv): a KV head
    # The step's metadata (positions, slots) and the RoPE table are read before the PDL wait, while the
    # qkv product still runs: no kernel of the step writes them (module docstring).
    pos = tl.load(positions_ptr + token, cache_modifier=".cg").to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token, cache_modifier=".cg").to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs_p + i, mask=i_mask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs_p + HALF + i, mask=i_mask, other=0.0)
    pdl_wait(USE_PDL)            # q, k, v are the previous kernel's output
    if head < NUM_Q_HEADS:
        base = q_ptr + token * stride_q_t + head.to(tl.int64) * stride_q_h
        x1, x2 = _head_halves(base, i, i_mask, q_norm_ptr, eps, HALF, USE_QK_NORM)
        tl.store(base + i, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=i_mask)
        tl.store(base + HALF + i, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=i_mask)
    else:
        kv = (head - NUM_Q_HEADS).to(tl.int64)
        mask = i_mask & (slot + i * 0 >= 0)  # slot -1: nothing stored (a vector mask, as in reshape_and_cache)
        slot = tl.maximum(slot, 0)
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        x1, x2 = _head_halves(k_ptr + token * stride_k_t + kv * stride_k_h, i, mask, k_norm_ptr, eps, HALF,
                              USE_QK_NORM)
        k_dst = k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot + kv * stride_kc_head
        tl.store(k_dst + i, (x1 * cos - x2 * sin).to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_dst + HALF + i, (x2 * cos + x1 * sin).to(k_cache_ptr.dtype.element_ty), mask=mask)
        v_src = v_ptr + token * stride_v_t + kv * stride_v_h
        v_dst = v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot + kv * stride_vc_head
        for half in tl.static_range(2):
            v = tl.load(v_src + half * HALF + i, mask=mask)
            tl.store(v_dst + half * HALF + i, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rotary_and_cache(positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache, q_norm=None,
                     k_norm=None, eps: float = 1e-6):
    """Rotate q [T, Hq, D] in place and write rotated k and v [T, Hkv, D] into the paged caches at
    slot_mapping[T] (-1 = skip); with q_norm/k_norm [D], Gemma 3's QK-norm runs first. k and v are
    not modified. One launch instead of rotary_embedding + reshape_and_cache. Returns q."""
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return q
    if (q_norm is None) != (k_norm is None):
        raise ValueError("rotary_and_cache needs both QK-norm weights or neither")
    if any(t.stride(-1) != 1 for t in (q, k, v, k_cache, v_cache, cos_sin_cache)) or head_dim % 2:
        raise ValueError("rotary_and_cache needs the head dimension contiguous and even")
    half = head_dim // 2
    rotary_and_cache_kernel[(num_tokens, num_q_heads + k.shape[1])](
        positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache,
        q_norm if q_norm is not None else cos_sin_cache, k_norm if k_norm is not None else cos_sin_cache,
        float(eps),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_Q_HEADS=num_q_heads, BLOCK_SIZE=k_cache.shape[1], HALF=half, BLOCK_HALF=next_pow2(half),
        USE_QK_NORM=q_norm is not None, num_warps=1 if head_dim <= 128 else 2,
        **pdl_launch(q.device, num_tokens),
    )
    return q

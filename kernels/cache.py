"""Writing new keys and values into the paged KV cache (one program per token and KV head).

Cache layout `[num_blocks, block_size, num_kv_heads, head_dim]`; slot = block * block_size + offset;
slot -1 marks a token whose KV is not stored (padding, or a position a sliding window no longer needs).
Offsets are computed in int64: a large cache passes 2**31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.common import next_pow2


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

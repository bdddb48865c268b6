"""Plain-torch reference twins of every kernel in kernels/: slow, per-sequence, obviously correct.

Each `<name>_ref` has the signature of the Triton launcher `<name>` (see compress/kernels.py for the
contract). They run on any device and are the CPU path of the serving runtime.

Shapes: paged KV cache `[num_blocks, block_size, num_kv_heads, head_dim]`; logical block i of sequence
b lives at physical block `block_tables[b, i]`; slot = block * block_size + offset. Attention follows
Gemma 2/3 (Hugging Face semantics): scores are scaled, then soft-capped `c * tanh(s / c)`, a causal mask
with an optional sliding window that counts the current token (`pos - j < window`), softmax in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reshape_and_cache_ref(key, value, k_cache, v_cache, slot_mapping) -> None:
    """Write key/value [T, Hkv, D] into the paged caches at slot_mapping[T] (int64; -1 skips)."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = value[keep].to(v_cache.dtype)


def gather_kv(cache, block_table, length: int, first: int = 0) -> torch.Tensor:
    """Positions [first, length) of one sequence as a contiguous [n, Hkv, D] tensor.

    Only the blocks holding those positions are touched, so stale entries before `first` are never read.
    """
    block_size = cache.shape[1]
    positions = torch.arange(first, length, device=cache.device)
    blocks = block_table[positions // block_size].long()
    return cache[blocks, positions % block_size]


def attend_one(q, k, v, q_pos, k_pos, *, scale, sliding_window, softcap) -> torch.Tensor:
    """Attention of q [n, Hq, D] at absolute positions q_pos over k, v [m, Hkv, D] at k_pos, in fp32."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [Hq, n, m]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    distance = q_pos[:, None] - k_pos[None, :]  # [n, m]
    allowed = distance >= 0
    if sliding_window is not None:
        allowed &= distance < sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def _first_visible(first_query_pos: int, sliding_window) -> int:
    if sliding_window is None:
        return 0
    return max(0, first_query_pos - sliding_window + 1)


def paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, *,
                                max_seqlen_q: int, scale: float, sliding_window=None, softcap=None,
                                out=None) -> torch.Tensor:
    """Variable-length causal attention of q [T, Hq, D] over each sequence's paged context."""
    out = torch.empty_like(q) if out is None else out
    for b in range(seq_lens.shape[0]):
        start, end = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        if end == start:
            continue
        length = int(seq_lens[b])
        q_pos = torch.arange(length - (end - start), length, device=q.device)
        first = _first_visible(int(q_pos[0]), sliding_window)
        k = gather_kv(k_cache, block_tables[b], length, first)
        v = gather_kv(v_cache, block_tables[b], length, first)
        k_pos = torch.arange(first, length, device=q.device)
        out[start:end] = attend_one(q[start:end], k, v, q_pos, k_pos, scale=scale,
                                    sliding_window=sliding_window, softcap=softcap).to(out.dtype)
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, *, scale: float,
                               sliding_window=None, softcap=None, out=None) -> torch.Tensor:
    """One new token per sequence: q [B, Hq, D] at position seq_lens[b] - 1."""
    batch = q.shape[0]
    cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                       max_seqlen_q=1, scale=scale, sliding_window=sliding_window,
                                       softcap=softcap, out=out)


def rms_norm_ref(x, weight, eps: float, residual=None, out=None):
    """Gemma RMSNorm of x [T, H]: norm in fp32 times (1 + weight), cast back to x.dtype.

    With `residual`, first forms `x + residual` in x.dtype (as Hugging Face adds the residual stream),
    normalizes that sum and returns (normed, sum); `residual` is not modified.
    """
    summed = x if residual is None else x + residual
    xf = summed.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    normed = (normed * (1.0 + weight.float())).to(x.dtype)
    if out is not None:
        out.copy_(normed)
        normed = out
    return normed if residual is None else (normed, summed)


def embed_rms_norm_ref(ids, table, scale: float, weight, eps: float, src_rows=None, prev_tokens=None):
    """(norm(table[ids] * scale), table[ids] * scale); rows with src_rows >= 0 embed prev_tokens[src]."""
    ids = ids.long()
    if src_rows is not None:
        src = src_rows.long()
        ids = torch.where(src >= 0, prev_tokens.long()[src.clamp(min=0)], ids)
    x = F.embedding(ids, table) * torch.tensor(scale, dtype=table.dtype)
    return rms_norm_ref(x, weight, eps), x


def rms_norm_pair_ref(x, w1, w2, eps: float, residual, residual_settled: bool = False):
    """(norm2(norm1(x) + residual), norm1(x) + residual): two Gemma norms with the residual add between
    (`residual_settled` is a launch hint of the Triton twin)."""
    return rms_norm_ref(rms_norm_ref(x, w1, eps), w2, eps, residual=residual)


def add_layer_norm_ref(x, residual, weight, bias, eps: float):
    """LayerNorm(x + residual) over the last dimension, as a post-norm encoder layer computes it: the sum
    in x.dtype (the unfused add), mean and variance in fp32, affine, rounded once to x.dtype."""
    summed = (x + residual).float()
    return F.layer_norm(summed, (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def ffn_add_layer_norm_ref(x, w1, b1, w2, b2, weight, bias, eps: float):
    """LayerNorm(x + W2 gelu(W1 x + b1) + b2): a post-norm encoder's FFN sublayer, run as its modules run
    it (two Linears and the exact GELU in x.dtype, then `add_layer_norm_ref`)."""
    return add_layer_norm_ref(F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), x, weight, bias, eps)


def logits_small_m_ref(x, weight, softcap=None, argmax_out=None):
    """fp32 logits of x [M, K] against weight [N, K], soft-capped (cap * tanh(y / cap)) when softcap is set;
    with argmax_out [M] int64, their row-wise argmax written there too."""
    logits = F.linear(x, weight).float()
    logits = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    if argmax_out is not None:
        torch.argmax(logits, dim=1, out=argmax_out)
    return logits


def linear_small_m_ref(x, weight, out=None):
    """x [M, K] @ weight [N, K]^T -> [M, N] in x.dtype (any M; the Triton twin is meant for M <= 4)."""
    y = F.linear(x, weight)
    if out is None:
        return y
    out.copy_(y)
    return out


def gelu_tanh_and_mul_gemv_ref(x, gate_up_weight):
    """Gemma's GeGLU on the fused [gate; up] weight [2I, K]: gelu_tanh(x @ Wg^T) * (x @ Wu^T) -> [M, I].

    The products round to x.dtype (as a GEMM would); GELU and the product run in fp32, rounded once."""
    gate, up = F.linear(x, gate_up_weight).float().chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") * up).to(x.dtype)


def rotary_embedding_ref(positions, q, k, cos_sin_cache):
    """Rotate-half (NeoX / Hugging Face) rotary embedding of q [T, Hq, D] and k [T, Hkv, D] in place.

    cos_sin_cache [max_position, D] fp32 holds cos(pos * inv_freq) in its first D/2 columns and sin in
    the rest. Arithmetic in fp32, rounded once to the input dtype.
    """
    half = cos_sin_cache.shape[1] // 2
    cos, sin = cos_sin_cache[positions.long()].float().split(half, dim=-1)  # [T, D/2] each
    for x in (q, k):
        x1, x2 = x.float().split(half, dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype))
    return q, k


def rotary_and_cache_ref(positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache, q_norm=None,
                         k_norm=None, eps: float = 1e-6):
    """Gemma 3's QK-norm (when q_norm/k_norm [D] are given), then rotary on q [T, Hq, D] in place and on
    a copy of k [T, Hkv, D], which goes into the paged caches with v at slot_mapping (-1 skips). Returns q."""
    if (q_norm is None) != (k_norm is None):
        raise ValueError("rotary_and_cache needs both QK-norm weights or neither")
    if q_norm is not None:
        q.copy_(rms_norm_ref(q, q_norm, eps))
        k = rms_norm_ref(k, k_norm, eps)
    k = k.clone()
    rotary_embedding_ref(positions, q, k, cos_sin_cache)
    reshape_and_cache_ref(k, v, k_cache, v_cache, slot_mapping)
    return q

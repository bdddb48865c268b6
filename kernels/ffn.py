"""A narrow feed-forward block with its residual add and LayerNorm, in one kernel (post-norm encoders).

`LayerNorm(x + W2 gelu(W1 x + b1) + b2)` is the second half of every BERT-family layer. Pruning leaves
many layers with few FFN filters (MPNet-base at FLOPs 0.5: 8 to 288 of 3072 in its last five layers),
and there cuBLAS costs what the activations' traffic costs, not what the arithmetic does: FFN1 reads x
and FFN2 writes a full [tokens, hidden] output however narrow the middle, then GELU and the add + norm
pass over the data again. On an H200, 4096 tokens x hidden 768 in bf16: about 10.5 us for the block at 8
to 64 filters, and 6 us more for the add + norm (evals/results/encoder_ffn.md). Here each program reads
its rows of x once and writes the normalized rows once; the middle [rows, filters] stays in registers.

Per program, BLOCK_M rows:
1. h = x W1^T over K tiles of TILE_H (fp32 accumulator [BLOCK_M, BLOCK_F], the filters padded to a power
   of two); + b1, rounded to the activation dtype as cuBLAS's output is; exact (erf) GELU, rounded again.
2. Over N tiles of the hidden size: y = h W2^T + b2 (rounded), s = y + x (rounded, as the unfused add),
   stored in `out`; the row's mean and M2 merged tile by tile (Chan et al.'s pairwise update, so no
   E[s^2] - E[s]^2 cancellation).
3. After a barrier, each tile of s is read back and normalized in place.
The weights are read by every program (from L2), so programs hold at least 16 rows, and 32 once the
filters pass 64. The hidden size is walked in TILE_H-wide tiles, 256 where that divides it (64-wide
tiles made the kernel slower than the three it replaces: 18 against 16 us at 8 filters). Hidden sizes
must be multiples of 64 (BERT-family sizes are).

Measured (H200, 4096 x 768, bf16, graph replays; evals/results/encoder_ffn.md): 11-13.5 us at 8 to 64
filters against 16.2-16.4 us for cuBLAS's block + the add + norm kernel, and no gain at 128 (17.6
against 17.8): the kernel is bound by each program's chain of dependent loads, not by bandwidth, so
compress/arch/fast_path.py fuses blocks of at most 64 filters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import as_rows, dot_upcast, next_pow2

# Widths the kernel takes: checked on the H200 up to 128 (BLOCK_F 128). At 256 (32 rows, 8 warps) its
# output was wrong on the GPU while right in the interpreter (not investigated: from 128 filters on
# the fused block is no faster than cuBLAS + the add + norm kernel, evals/results/encoder_ffn.md).
MAX_FILTERS = 128
MIN_BLOCK_F = 16      # tl.dot's smallest dimension
TILE = 64             # the smallest K and N tile; the hidden size must be a multiple


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def ffn_add_layer_norm_kernel(
    x_ptr,                       # [T, H] the block's input and its residual
    w1_ptr, b1_ptr,              # [F, H], [F]
    w2_ptr, b2_ptr,              # [H, F], [H]
    weight_ptr, bias_ptr,        # [H] LayerNorm affine
    out_ptr,                     # [T, H]
    num_rows, filters, eps,
    stride_x_t, stride_w1_f, stride_w2_h, stride_out_t,
    HIDDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, TILE_H: tl.constexpr,
    UPCAST: tl.constexpr,        # dot operands in fp32 (the triton 3.9 interpreter's bf16 dot is wrong)
):
    dtype = out_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    f = tl.arange(0, BLOCK_F)
    f_mask = f < filters
    cols = tl.arange(0, TILE_H)

    acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, HIDDEN, TILE_H):
        x = tl.load(x_ptr + rows[:, None] * stride_x_t + (k0 + cols)[None, :], mask=row_mask[:, None], other=0.0)
        w1 = tl.load(w1_ptr + f[:, None] * stride_w1_f + (k0 + cols)[None, :], mask=f_mask[:, None], other=0.0)
        if UPCAST:
            x, w1 = x.to(tl.float32), w1.to(tl.float32)
        acc = tl.dot(x, tl.trans(w1), acc)
    b1 = tl.load(b1_ptr + f, mask=f_mask, other=0.0).to(tl.float32)
    pre = (acc + b1[None, :]).to(dtype).to(tl.float32)
    h = tl.where(f_mask[None, :], _gelu(pre), 0.0).to(dtype)
    if UPCAST:
        h = h.to(tl.float32)

    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, HIDDEN, TILE_H):
        w2 = tl.load(w2_ptr + (n0 + cols)[:, None] * stride_w2_h + f[None, :], mask=f_mask[None, :], other=0.0)
        b2 = tl.load(b2_ptr + n0 + cols).to(tl.float32)
        if UPCAST:
            w2 = w2.to(tl.float32)
        y = (tl.dot(h, tl.trans(w2)) + b2[None, :]).to(dtype)
        x = tl.load(x_ptr + rows[:, None] * stride_x_t + (n0 + cols)[None, :], mask=row_mask[:, None], other=0.0)
        s = (y.to(tl.float32) + x.to(tl.float32)).to(dtype)
        tl.store(out_ptr + rows[:, None] * stride_out_t + (n0 + cols)[None, :], s, mask=row_mask[:, None])
        s = s.to(tl.float32)
        tile_mean = tl.sum(s, axis=1) / TILE_H
        centered = s - tile_mean[:, None]
        tile_m2 = tl.sum(centered * centered, axis=1)
        seen = n0 * 1.0                              # elements merged so far (a float: n0 is a loop index)
        total = seen + TILE_H
        delta = tile_mean - mean
        mean += delta * (TILE_H / total)
        m2 += tile_m2 + delta * delta * (seen * TILE_H / total)
    rstd = 1.0 / tl.sqrt(m2 / HIDDEN + eps)

    tl.debug_barrier()                               # every thread's stores of s precede the re-reads
    for n0 in range(0, HIDDEN, TILE_H):
        ptrs = out_ptr + rows[:, None] * stride_out_t + (n0 + cols)[None, :]
        s = tl.load(ptrs, mask=row_mask[:, None], other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + n0 + cols).to(tl.float32)
        bias = tl.load(bias_ptr + n0 + cols).to(tl.float32)
        out = (s - mean[:, None]) * rstd[:, None] * weight[None, :] + bias[None, :]
        tl.store(ptrs, out.to(dtype), mask=row_mask[:, None])


DTYPES = (torch.bfloat16, torch.float16)  # tl.dot in fp32 would be TF32, not the fp32 GEMM torch runs


def supports(hidden: int, filters: int, dtype: torch.dtype) -> bool:
    """Whether `ffn_add_layer_norm` takes a block of this shape and dtype."""
    return hidden % TILE == 0 and 0 < filters <= MAX_FILTERS and dtype in DTYPES


def block_f(filters: int) -> int:
    return max(MIN_BLOCK_F, next_pow2(filters))


def launch_config(filters: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, TILE_H, warps, stages) for a block of `filters` filters: the fastest of
    evals/bench_encoder_ffn.py --sweep on the H200 at 4096 x 768 (8-64 filters: 16 rows, 4 warps; 128:
    32 rows, 8 warps; 3 stages; 256-wide tiles)."""
    return (16, 256, 4, 3) if block_f(filters) <= 64 else (32, 256, 8, 3)


def tile_for(hidden: int, tile: int) -> int:
    """The largest of tile, tile / 2, ..., 64 that divides `hidden` (a multiple of 64)."""
    while hidden % tile:
        tile //= 2
    return max(tile, TILE)


def ffn_add_layer_norm(x, w1, b1, w2, b2, weight, bias, eps: float, config: tuple | None = None):
    """LayerNorm(x + W2 gelu(W1 x + b1) + b2) over the last dimension of x [..., H], in x.dtype (bf16 or
    fp16); W1 [F, H], W2 [H, F], F <= MAX_FILTERS, H a multiple of 64. GELU is the exact (erf) one.
    `config` (BLOCK_M, TILE_H, warps, stages) overrides `launch_config`, for sweeps."""
    hidden, filters = x.shape[-1], w1.shape[0]
    shapes_ok = tuple(w1.shape) == (filters, hidden) and tuple(w2.shape) == (hidden, filters)
    if not shapes_ok or not supports(hidden, filters, x.dtype):
        raise ValueError(f"ffn_add_layer_norm: x [..., {hidden}] {x.dtype}, W1 {tuple(w1.shape)}, W2 {tuple(w2.shape)}: "
                         f"needs W1 [F, H], W2 [H, F], 0 < F <= {MAX_FILTERS}, H a multiple of {TILE}, dtype in {DTYPES}")
    tensors = (w1, b1, w2, b2, weight, bias)
    if any(t.dtype != x.dtype for t in tensors):
        raise ValueError("ffn_add_layer_norm needs x, weights and biases in one dtype")
    x2 = as_rows(x, hidden)
    w1, b1, w2, b2, weight, bias = (t.contiguous() for t in tensors)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, hidden)
    num_rows = x2.shape[0]
    if num_rows == 0:
        return out
    block_m, tile, num_warps, num_stages = config or launch_config(filters)
    ffn_add_layer_norm_kernel[(triton.cdiv(num_rows, block_m),)](
        x2, w1, b1, w2, b2, weight, bias, out2, num_rows, filters, float(eps),
        x2.stride(0), w1.stride(0), w2.stride(0), out2.stride(0),
        HIDDEN=hidden, BLOCK_M=block_m, BLOCK_F=block_f(filters), TILE_H=tile_for(hidden, tile),
        UPCAST=dot_upcast(x.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out

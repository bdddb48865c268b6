"""Skinny matrix products for small-batch decode: y = x @ W^T with a few rows of x, weights read once.

At batch 1-4 a decode step is a chain of matrix-vector products whose cost is reading the weights
(Gemma-2-2B: ~5 GB of bf16 per step). cuBLAS picks GEMM tiles meant for many rows and, for long K,
split-K plus a separate reduce kernel; here one program owns BLOCK_N output features (weight rows),
walks all of K in [BLOCK_N, BLOCK_K] tiles, and multiplies each tile into every row of x (M <= 4 per
program; larger M loops over row groups, re-reading the weights). Products accumulate elementwise in
fp32 ([BLOCK_M, BLOCK_N, BLOCK_K]) and reduce over K once at the end; the result is rounded once to
the activation dtype. No tensor cores: with M <= 4 a dot would waste >= 75% of a 16-row MMA and
the weight stream, not arithmetic, is the limit.

`gelu_tanh_and_mul_gemv` is Gemma's GeGLU on the fused gate|up weight [2I, K] (rows [0, I) gate,
[I, 2I) up, as `concat_linear(gate_proj, up_proj)` lays them out): one program computes gate and up
for the same BLOCK_N features, so tanh-GELU and the product happen in registers (fp32) instead of in
two more elementwise kernels over [M, 2I].

`logits_small_m` is the decode step's last product: the logits in fp32 with the soft-cap applied and,
when asked, their row-wise argmax (the greedy token) without a reduction kernel over the logits: each
program folds its tile's maximum and index into one int64 per row with an atomic max, and a
one-program-per-row finish launch unpacks it and resets the word for the next step.

Split-K (`GemvConfig.split_k > 1`, linear only) is for the small matrices (qkv 4096x2304, o_proj
2304x2048), whose few microseconds are mostly ramp-up and tail: SPLIT_K programs share an output tile,
each streams 1/SPLIT_K of K and writes fp32 partials; each then takes a ticket from a per-tile counter
(atomic, acq_rel) and the last to arrive sums the partials in split order, writes the output and
resets the counter to 0. One launch (a two-stage reduce would add one, an atomic fp32 reduce a memset
and a cast), and deterministic, unlike fp32 atomics whose summation order varies. The counters are
kernels.common.ticket_counters (persistent, so captured CUDA graphs stay valid).

Under PDL (kernels/common.py) a program waits for the previous kernel (whose output x is) before it
loads anything: the launch overlaps the kernel before, the weight stream does not. Loading the first
weight tile before the wait (peeled off the K loop) measured slower on the H100 (Gemma-2-2B batch-1
replay 2.47 against 2.28 ms; docs/kernels.md "PDL").

Launch configs come from tables keyed by (row bucket, weight rows N, K), filled from
`evals/bench_gemv.py --sweep` on the GPU; other shapes use `default_config`. Nothing is autotuned at
run time because decode steps are captured into CUDA graphs ahead of time. The runtime calls these
at up to kernels.GEMV_MAX_TOKENS rows (1 today: M=2 and 4 still lose to cuBLAS on the H100).
Shapes: x [M, K] (last dim contiguous), weight [N, K] (row-major), out [M, N].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .common import MAX_TICKETS, next_pow2, pdl_launch, pdl_wait, tanh, ticket_counters

MAX_ROWS_PER_PROGRAM = 4       # rows of x that share one read of the weights
# jit code may read module globals only as constexprs
GELU_TANH_C = tl.constexpr(0.7978845608028654)   # sqrt(2 / pi)
TWO_LOG2E = tl.constexpr(2.8853900817779268)      # exp(-2u) == exp2(-2u * log2(e))


@dataclass(frozen=True)
class GemvConfig:
    block_n: int               # weight rows (output features) per program
    block_k: int               # K columns per tile
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1           # programs sharing one output tile, each over 1/split_k of K (linear only)


# (rows bucket 1|2|4, N, K) -> config. M=1 entries: the best of `python evals/bench_gemv.py --sweep
# --rows 1` on the H100 (weights rotated past L2; evals/results/gemv_gpu.md); other shapes use default_config.
LINEAR_CONFIGS: dict[tuple[int, int, int], GemvConfig] = {
    (1, 4096, 2304): GemvConfig(4, 512, 4, 3),        # Gemma-2-2B qkv
    (1, 2304, 2048): GemvConfig(2, 1024, 4, 1),       # o_proj
    (1, 2304, 9216): GemvConfig(2, 1024, 4, 1),       # down_proj
    (1, 256000, 2304): GemvConfig(8, 256, 4, 3),      # lm_head
}
# Keyed by the fused weight's rows (2I); block_n counts output features, so a program reads 2*block_n rows.
GEGLU_CONFIGS: dict[tuple[int, int, int], GemvConfig] = {
    (1, 18432, 2304): GemvConfig(8, 256, 4, 1),       # gate_up + GeGLU
}


def rows_bucket(num_rows: int) -> int:
    return next_pow2(min(num_rows, MAX_ROWS_PER_PROGRAM))


def default_config(num_rows: int, n: int, k: int) -> GemvConfig:
    """About 2048 fp32 accumulators per program (16 per thread at 4 warps), long K tiles first."""
    block_m = rows_bucket(num_rows)
    block_k = min(1024 // block_m, next_pow2(k))
    block_n = max(1, min(16, 2048 // (block_m * block_k), next_pow2(n)))
    return GemvConfig(block_n, block_k)


def pick_config(table: dict, num_rows: int, n: int, k: int) -> GemvConfig:
    return table.get((rows_bucket(num_rows), n, k)) or default_config(num_rows, n, k)


@triton.jit
def _weight_tile(w_ptr, feats, feat_mask, k0, K, stride_w_n, BLOCK_K: tl.constexpr):
    """w[feats, k0:k0 + BLOCK_K] as [BLOCK_N, BLOCK_K], zero past K or N."""
    cols = k0 + tl.arange(0, BLOCK_K)
    w = w_ptr + feats.to(tl.int64)[:, None] * stride_w_n + cols[None, :]
    # weights stream through once: do not let them push x or the KV cache out of L2
    return tl.load(w, mask=feat_mask[:, None] & (cols < K)[None, :], other=0.0, eviction_policy="evict_first")


@triton.jit
def _rows_dot_tile(x_ptr, w_ptr, rows, row_mask, feats, feat_mask, K, stride_x_m, stride_w_n,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[rows] @ w[feats]^T as fp32 [BLOCK_M, BLOCK_N]; each weight tile is loaded once for all rows."""
    x_base = x_ptr + rows.to(tl.int64)[:, None] * stride_x_m           # [BLOCK_M, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = _weight_tile(w_ptr, feats, feat_mask, k0, K, stride_w_n, BLOCK_K)
        x = tl.load(x_base + cols[None, :], mask=row_mask[:, None] & (cols < K)[None, :], other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return tl.sum(acc, axis=2)


@triton.jit
def _small_m_product(x_ptr, w_ptr, out_ptr, M, N, K, stride_x_m, stride_w_n, stride_out_m,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's tile of x @ w^T (fp32 [BLOCK_M, BLOCK_N]) with its output pointers and mask."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, feat_mask = rows < M, feats < N
    y = _rows_dot_tile(x_ptr, w_ptr, rows, row_mask, feats, feat_mask, K, stride_x_m, stride_w_n,
                       BLOCK_M, BLOCK_N, BLOCK_K)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out_m + feats[None, :]
    return y, out, row_mask[:, None] & feat_mask[None, :]


@triton.jit
def linear_small_m_kernel(
    x_ptr,                       # [M, K]
    w_ptr,                       # [N, K]
    out_ptr,                     # [M, N]
    M, N, K,
    stride_x_m, stride_w_n, stride_out_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)            # x is the previous kernel's output
    y, out, mask = _small_m_product(x_ptr, w_ptr, out_ptr, M, N, K, stride_x_m, stride_w_n, stride_out_m,
                                    BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def logits_small_m_kernel(
    x_ptr,                       # [M, K]
    w_ptr,                       # [N, K] (the lm_head or tied embedding)
    out_ptr,                     # [M, N] fp32
    M, N, K,
    stride_x_m, stride_w_n, stride_out_m, softcap,
    best_ptr,                    # [M] int64 packed (value, index) maxima, INT64_MIN between launches
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    ARGMAX: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)            # x is the previous kernel's output (and `best` the last finish's reset)
    y, out, mask = _small_m_product(x_ptr, w_ptr, out_ptr, M, N, K, stride_x_m, stride_w_n, stride_out_m,
                                    BLOCK_M, BLOCK_N, BLOCK_K)
    y = y.to(x_ptr.dtype.element_ty).to(tl.float32)      # rounded where the product's output would be
    if USE_SOFTCAP:
        y = softcap * tanh(y / softcap)
    tl.store(out, y, mask=mask)
    if ARGMAX:
        # This tile's maximum per row, packed as (ordered value bits << 32) | (2^32 - 1 - index) so that one
        # signed 64-bit max picks the larger value and, on a tie, the smaller index (torch.argmax's first
        # maximum); every program adds its candidate with a fire-and-forget atomic max.
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        feats = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        y = tl.where(mask, y + 0.0, float("-inf"))       # + 0.0: -0.0 ties with +0.0, as in torch
        tile_max = tl.max(y, axis=1)
        index = tl.min(tl.where(y == tile_max[:, None], feats[None, :], N), axis=1)
        bits = tile_max.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)   # monotone in the float value
        packed = (ordered << 32) | (0xFFFFFFFF - index.to(tl.int64))
        tl.atomic_max(best_ptr + rows, packed, mask=rows < M, sem="relaxed")


@triton.jit
def argmax_finish_kernel(best_ptr, tokens_ptr, USE_PDL: tl.constexpr):
    """tokens[row] = the index packed in best[row]; best[row] back to INT64_MIN for the next launch."""
    row = tl.program_id(0)
    pdl_wait(USE_PDL)            # every program of the logits kernel has added its candidate
    packed = tl.load(best_ptr + row)
    tl.store(tokens_ptr + row, 0xFFFFFFFF - (packed & 0xFFFFFFFF))
    tl.store(best_ptr + row, -9223372036854775807 - 1)


@triton.jit
def gelu_tanh_and_mul_gemv_kernel(
    x_ptr,                       # [M, K]
    w_ptr,                       # [2I, K]: gate rows [0, I), up rows [I, 2I)
    out_ptr,                     # [M, I]
    M, I, K,
    stride_x_m, stride_w_n, stride_out_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, feat_mask = rows < M, feats < I
    pdl_wait(USE_PDL)            # x is the previous kernel's output
    gate = _rows_dot_tile(x_ptr, w_ptr, rows, row_mask, feats, feat_mask, K, stride_x_m, stride_w_n,
                          BLOCK_M, BLOCK_N, BLOCK_K)
    up = _rows_dot_tile(x_ptr, w_ptr, rows, row_mask, feats + I, feat_mask, K, stride_x_m, stride_w_n,
                        BLOCK_M, BLOCK_N, BLOCK_K)
    # 0.5 * g * (1 + tanh(u)) == g * sigmoid(2u); u clamped to +-30 (where sigmoid(2u) is 0 or 1 in
    # fp32 anyway) so exp2 never overflows
    inner = GELU_TANH_C * (gate + 0.044715 * gate * gate * gate)
    inner = tl.minimum(tl.maximum(inner, -30.0), 30.0)
    y = gate / (1.0 + tl.exp2(-inner * TWO_LOG2E)) * up
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_out_m + feats[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & feat_mask[None, :])


@triton.jit
def linear_split_k_kernel(
    x_ptr,                       # [M, K]
    w_ptr,                       # [N, K]
    out_ptr,                     # [M, N]
    part_ptr,                    # [SPLIT_K, M, N] fp32 partial products
    count_ptr,                   # [>= tiles] int32 tickets, 0 between launches
    M, N, K,
    stride_x_m, stride_w_n, stride_out_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    feats = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    row_mask, feat_mask = rows < M, feats < N
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K     # whole tiles; a split may be empty
    k_lo = split * k_per_split
    k_len = tl.maximum(tl.minimum(K - k_lo, k_per_split), 0)
    pdl_wait(USE_PDL)            # x, and the tickets and partials the previous split-K launch used
    y = _rows_dot_tile(x_ptr + k_lo, w_ptr + k_lo, rows, row_mask, feats, feat_mask, k_len,
                       stride_x_m, stride_w_n, BLOCK_M, BLOCK_N, BLOCK_K)
    tile_mask = row_mask[:, None] & feat_mask[None, :]
    part = part_ptr + rows.to(tl.int64)[:, None] * N + feats[None, :]           # [BLOCK_M, BLOCK_N]
    tl.store(part + split.to(tl.int64) * M * N, y, mask=tile_mask)
    tl.debug_barrier()           # every thread's partial is stored before the (one-thread) release
    tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    ticket = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
    if ticket == SPLIT_K - 1:    # the last split of this tile: the others' partials are visible
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(part + s * M * N, mask=tile_mask, other=0.0, cache_modifier=".cg")
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_out_m + feats[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(count_ptr + tile, 0)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"need x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("gemv needs the K dimension contiguous in x and weight")


def launch(kernel, x, weight, out, n_out: int, config: GemvConfig, **extra) -> None:
    """Run `kernel` over out [M, n_out] with `config` (the benchmark's sweep calls this directly);
    `extra`: the kernel's own further arguments, by name."""
    num_rows, k = x.shape
    block_m = rows_bucket(num_rows)
    grid = (triton.cdiv(n_out, config.block_n), triton.cdiv(num_rows, block_m))
    if config.split_k > 1:
        if kernel is not linear_small_m_kernel:
            raise ValueError("split_k > 1 is for linear_small_m_kernel only (GeGLU needs whole sums)")
        if grid[0] * grid[1] <= MAX_TICKETS:
            return _launch_split_k(x, weight, out, grid, block_m, config)
    kernel[grid](x, weight, out, num_rows, n_out, k, x.stride(0), weight.stride(0), out.stride(0), **extra,
                 BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                 num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch(x.device, num_rows))


def _launch_split_k(x, weight, out, grid, block_m: int, config: GemvConfig) -> None:
    num_rows, k = x.shape
    n_out = weight.shape[0]
    # fp32 partials from the caching allocator: inside a CUDA graph capture they live in its pool
    part = torch.empty(config.split_k, num_rows, n_out, dtype=torch.float32, device=x.device)
    linear_split_k_kernel[(*grid, config.split_k)](
        x, weight, out, part, ticket_counters(x.device), num_rows, n_out, k,
        x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_launch(x.device, num_rows))


def _empty_or_zero(out: torch.Tensor, k: int) -> bool:
    """Degenerate shapes (slimmed layers with 0 heads or 0 filters) need no launch: K == 0 sums to 0."""
    if out.numel() == 0:
        return True
    if k == 0:
        out.zero_()
        return True
    return False


def linear_small_m(x, weight, out=None):
    """x [M, K] @ weight [N, K]^T -> [M, N] in x.dtype (fp32 accumulate); meant for M <= 4."""
    _check(x, weight)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device) if out is None else out
    if not _empty_or_zero(out, x.shape[1]):
        config = pick_config(LINEAR_CONFIGS, x.shape[0], weight.shape[0], x.shape[1])
        launch(linear_small_m_kernel, x, weight, out, weight.shape[0], config)
    return out


_argmax_slots: dict = {}


def argmax_slots(device: torch.device, rows: int) -> torch.Tensor:
    """The device's persistent packed-maximum words of `logits_small_m(..., argmax_out=)`, INT64_MIN
    between launches (each finish resets its rows). Allocated once, so captured graphs stay valid; shared
    in stream order like the ticket counters."""
    slots = _argmax_slots.get(device)
    if slots is None or slots.numel() < rows:
        if slots is not None and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("argmax slots must be allocated before a CUDA graph capture")
        slots = torch.full((max(rows, 64),), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device)
        _argmax_slots[device] = slots
    return slots


def logits_small_m(x, weight, softcap=None, argmax_out=None):
    """Logits of a decode step: fp32 [M, N] = softcap * tanh(y / softcap) for y = x @ weight^T rounded to
    x.dtype (what `linear_small_m(x, weight).float()` and the separate soft-cap ops give, up to the last
    bits of tanh), in one launch instead of four. With `argmax_out` (int64 [M]) the row-wise argmax too
    (torch.argmax's first maximum), from atomic maxima the same programs add, and a one-program-per-row
    finish launch instead of torch's reduction over the logits."""
    _check(x, weight)
    num_rows, n_out = x.shape[0], weight.shape[0]
    out = torch.empty(num_rows, n_out, dtype=torch.float32, device=x.device)
    fused_argmax = argmax_out is not None and n_out > 0 and x.shape[1] > 0
    if not _empty_or_zero(out, x.shape[1]):
        config = pick_config(LINEAR_CONFIGS, num_rows, n_out, x.shape[1])
        best = argmax_slots(x.device, num_rows) if fused_argmax else out
        launch(logits_small_m_kernel, x, weight, out, n_out, replace(config, split_k=1), best_ptr=best,
               softcap=float(softcap or 1.0), USE_SOFTCAP=softcap is not None, ARGMAX=fused_argmax)
        if fused_argmax:
            argmax_finish_kernel[(num_rows,)](best, argmax_out, **pdl_launch(x.device, num_rows))
    if argmax_out is not None and not fused_argmax:
        torch.argmax(out, dim=1, out=argmax_out)
    return out


def gelu_tanh_and_mul_gemv(x, gate_up_weight):
    """gelu_tanh(x @ Wg^T) * (x @ Wu^T) -> [M, I] for gate_up_weight = [Wg; Wu] of shape [2I, K]."""
    _check(x, gate_up_weight)
    if gate_up_weight.shape[0] % 2:
        raise ValueError(f"gate_up_weight needs an even number of rows, got {gate_up_weight.shape[0]}")
    width = gate_up_weight.shape[0] // 2
    out = torch.empty(x.shape[0], width, dtype=x.dtype, device=x.device)
    if not _empty_or_zero(out, x.shape[1]):
        config = pick_config(GEGLU_CONFIGS, x.shape[0], gate_up_weight.shape[0], x.shape[1])
        launch(gelu_tanh_and_mul_gemv_kernel, x, gate_up_weight, out, width, config)
    return out

"""LayerNorm with the residual add in front, for post-norm encoders (BERT, RoBERTa, MPNet).

Every encoder layer ends its two branches with `LayerNorm(branch + residual)`; in PyTorch that is an
add kernel (read 2, write 1) and a norm kernel (read 1, write 1) over [tokens, hidden]. Here one
kernel reads both inputs once and writes the normalized row: 3 passes over the tensor instead of 5.
Semantics follow the unfused module: the sum is rounded to the activation dtype (as `x + residual`
is), mean and variance are fp32 over the whole row (biased variance, as nn.LayerNorm), and the
result is rounded once. Shapes: x, residual, out [T, H], last dimension contiguous; weight, bias [H].

BLOCK_T rows per program, each row whole in registers (BLOCK_H = next power of two of H, masked),
about eight elements per thread so that bf16 rows load as 16-byte vectors. Hidden sizes up to 8192.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import as_rows, next_pow2

MAX_HIDDEN = 8192
ELEMENTS_PER_THREAD = 8     # one 16-byte load of bf16 per thread and row chunk


@triton.jit
def add_layer_norm_kernel(
    x_ptr,                       # [T, H] branch output
    residual_ptr,                # [T, H] the residual stream
    weight_ptr,                  # [H]
    bias_ptr,                    # [H]
    out_ptr,                     # [T, H] LayerNorm(x + residual)
    num_rows, eps,
    stride_x_t, stride_residual_t, stride_out_t,
    HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)
    h_mask = h < HIDDEN
    mask = (rows[:, None] < num_rows) & h_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x_t + h[None, :], mask=mask, other=0.0)
    residual = tl.load(residual_ptr + rows[:, None] * stride_residual_t + h[None, :], mask=mask, other=0.0)
    # round the sum where the unfused `x + residual` would, then do the statistics in fp32
    summed = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
    mean = tl.sum(summed, axis=1) / HIDDEN
    centered = tl.where(mask, summed - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / HIDDEN + eps)
    weight = tl.load(weight_ptr + h, mask=h_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + h, mask=h_mask, other=0.0).to(tl.float32)
    out = centered * rstd[:, None] * weight[None, :] + bias[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out_t + h[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(hidden: int) -> tuple[int, int]:
    """(rows per program, warps): at least 1024 elements per program (MiniLM's 384 takes 2 rows), eight
    per thread, at most 8 warps. Not autotuned: encoder forwards are captured into CUDA graphs."""
    block_h = next_pow2(hidden)
    block_t = max(1, 1024 // block_h)
    num_warps = min(8, max(1, block_t * block_h // (32 * ELEMENTS_PER_THREAD)))
    return block_t, num_warps


def add_layer_norm(x, residual, weight, bias, eps: float):
    """LayerNorm(x + residual) over the last dimension, in x.dtype; x and residual [..., H] alike."""
    hidden = x.shape[-1]
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"add_layer_norm needs x and residual alike, got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"add_layer_norm keeps a row in registers: hidden {hidden} > {MAX_HIDDEN}")
    x2, res2 = as_rows(x, hidden), as_rows(residual, hidden)
    weight, bias = weight.contiguous(), bias.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, hidden)
    num_rows = x2.shape[0]
    if num_rows == 0:
        return out
    block_t, num_warps = launch_config(hidden)
    add_layer_norm_kernel[(triton.cdiv(num_rows, block_t),)](
        x2, res2, weight, bias, out2, num_rows, float(eps),
        x2.stride(0), res2.stride(0), out2.stride(0),
        HIDDEN=hidden, BLOCK_H=next_pow2(hidden), BLOCK_T=block_t, num_warps=num_warps,
    )
    return out

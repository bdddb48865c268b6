"""Paged-attention, fused-norm and small-batch GEMV kernels for the serving runtime, and the fused
residual-add LayerNorm of the encoders' fast path (Triton on GPU, plain torch elsewhere).

Use the dispatched API: `from kernels import paged_decode_attention, ...`; the backend is chosen once
(kernels/dispatch.py). Every Triton launcher `<name>` in kernels/{cache,prefill,decode,norm,layer_norm,gemv}.py
has a plain-torch twin `<name>_ref` in kernels/reference.py with the same signature.
"""

from kernels.dispatch import (add_layer_norm, backend_name, gelu_tanh_and_mul_gemv, linear_small_m,
                              paged_decode_attention, paged_prefill_attention, reshape_and_cache, rms_norm,
                              rms_norm_pair, rotary_and_cache, rotary_embedding, set_backend)

# Token counts up to this use the GEMV ops (weights read once for all rows); more use a GEMM. On the
# H100 (evals/results/gemv_gpu.md) the GEMVs beat cuBLAS at one row (Gemma-2-2B decode products
# 2.02 vs 2.26 ms) but not yet at 2 or 4 (0.95x, 0.67x with untuned configs), so batch 1 only.
GEMV_MAX_TOKENS = 1

__all__ = ["GEMV_MAX_TOKENS", "add_layer_norm", "backend_name", "gelu_tanh_and_mul_gemv", "linear_small_m",
           "paged_decode_attention", "paged_prefill_attention", "reshape_and_cache", "rms_norm",
           "rms_norm_pair", "rotary_and_cache", "rotary_embedding", "set_backend"]

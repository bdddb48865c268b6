"""Paged-attention, fused-norm and small-batch GEMV kernels for the serving runtime (Triton on GPU, plain
torch elsewhere).

Use the dispatched API: `from kernels import paged_decode_attention, ...`; the backend is chosen once
(kernels/dispatch.py). Every Triton launcher `<name>` in kernels/{cache,prefill,decode,norm,gemv}.py has
a plain-torch twin `<name>_ref` in kernels/reference.py with the same signature.
"""

from kernels.dispatch import (backend_name, gelu_tanh_and_mul_gemv, linear_small_m, paged_decode_attention,
                              paged_prefill_attention, reshape_and_cache, rms_norm, rms_norm_pair,
                              rotary_embedding, set_backend)

# Token counts up to this use the GEMV ops (weights read once for all rows); more use a GEMM.
GEMV_MAX_TOKENS = 4

__all__ = ["GEMV_MAX_TOKENS", "backend_name", "gelu_tanh_and_mul_gemv", "linear_small_m",
           "paged_decode_attention", "paged_prefill_attention", "reshape_and_cache", "rms_norm",
           "rms_norm_pair", "rotary_embedding", "set_backend"]

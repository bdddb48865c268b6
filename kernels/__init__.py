"""Paged-attention and fused-norm kernels for the serving runtime (Triton on GPU, plain torch elsewhere).

Use the dispatched API: `from kernels import paged_decode_attention, ...`; the backend is chosen once
(kernels/dispatch.py). Every Triton launcher `<name>` in kernels/{cache,prefill,decode,norm}.py has a
plain-torch twin `<name>_ref` in kernels/reference.py with the same signature.
"""

from kernels.dispatch import (backend_name, paged_decode_attention, paged_prefill_attention,
                              reshape_and_cache, rms_norm, rotary_embedding, set_backend)

__all__ = ["backend_name", "paged_decode_attention", "paged_prefill_attention", "reshape_and_cache",
           "rms_norm", "rotary_embedding", "set_backend"]

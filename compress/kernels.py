"""Paged-attention, fused-norm and small-batch GEMV kernels for the serving runtime, and the fused
residual-add LayerNorm and narrow FFN block of the encoders' fast path (Triton on GPU, plain torch elsewhere).

Use the dispatched API: `from compress.kernels import paged_decode_attention, ...`; the backend is
chosen once (kernels/dispatch.py, `set_backend`). The A/B options (PDL, fused logits, decode launch
config) are set with `set_options` or, for a block, `using_options`, and read with `kernel_options`
(kernels/options.py). Every Triton launcher `<name>` in kernels/{cache,prefill,decode,norm,layer_norm,
ffn,gemv}.py has a plain-torch twin `<name>_ref` in kernels/reference.py with the same signature.

Why this module is the package of the top-level kernels/ directory: the import name `kernels` belongs to
Hugging Face's `kernels` distribution, which transformers imports whenever it is installed (a hard
dependency from transformers 5.25 on). A kernels/__init__.py would shadow it for every process started
in the repository root (`python -m pytest`, `python -c`) and break `import transformers.modeling_utils`;
a wheel would overwrite its files. So kernels/ has no __init__.py, and this module, which sets
`__path__`, makes its files the submodules of `compress.kernels`: read from kernels/ in a source tree
(editable install or PYTHONPATH), from compress/kernels/ in an installed wheel (pyproject.toml maps
the directory there).
"""

from pathlib import Path

_here = Path(__file__).resolve()
_installed = _here.with_suffix("")  # site-packages/compress/kernels/ in a wheel install
__path__ = [str(_installed if (_installed / "dispatch.py").is_file() else _here.parents[1] / "kernels")]

from compress.kernels.dispatch import (add_layer_norm, backend_name, embed_rms_norm,  # noqa: E402
                                       ffn_add_layer_norm, fused_logits, gelu_tanh_and_mul_gemv,
                                       linear_small_m, logits_small_m, paged_decode_attention, paged_prefill_attention,
                                       reshape_and_cache, rms_norm, rms_norm_pair, rotary_and_cache,
                                       rotary_embedding, set_backend)
from compress.kernels.options import (DecodeConfig, KernelOptions, kernel_options, set_options,  # noqa: E402
                                      using_options)

# Token counts up to this use the GEMV ops (weights read once for all rows); more use a GEMM. On the
# H100 (evals/results/gemv_gpu.md) the GEMVs beat cuBLAS at one row (Gemma-2-2B decode products
# 2.02 vs 2.26 ms) but not yet at 2 or 4 (0.95x, 0.67x with untuned configs), so batch 1 only.
GEMV_MAX_TOKENS = 1

__all__ = ["DecodeConfig", "GEMV_MAX_TOKENS", "KernelOptions", "add_layer_norm", "backend_name", "embed_rms_norm",
           "ffn_add_layer_norm", "fused_logits", "gelu_tanh_and_mul_gemv", "kernel_options", "linear_small_m",
           "logits_small_m", "paged_decode_attention", "paged_prefill_attention", "reshape_and_cache", "rms_norm",
           "rms_norm_pair", "rotary_and_cache", "rotary_embedding", "set_backend", "set_options", "using_options"]

"""Picks the kernel backend once and exposes one API for both (the runtime imports only this).

Backends: "triton" (kernels/cache.py, prefill.py, decode.py, norm.py, layer_norm.py, ffn.py, gemv.py) when CUDA and Triton are present,
else "reference" (kernels/reference.py, plain torch, any device). Env KERNELS_BACKEND=triton|reference
overrides the choice at import (the one kernel setting read from the environment); tests call
`set_backend`. The other kernel options (PDL, fused logits, decode launch config) are set through
`set_options` (kernels/options.py). Compiled Triton kernels cannot read host memory, so an op whose
tensors are on the CPU runs the reference (an engine pinned to the CPU on a GPU machine), unless the
Triton interpreter is on. Signatures are those of the paged-KV contract in compress/kernels.py.
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import torch

from .options import kernel_options

BACKENDS = ("triton", "reference")
OPS = ("reshape_and_cache", "rotary_and_cache", "paged_prefill_attention", "paged_decode_attention", "rms_norm",
       "rms_norm_pair", "embed_rms_norm", "rotary_embedding", "linear_small_m", "logits_small_m",
       "gelu_tanh_and_mul_gemv", "add_layer_norm", "ffn_add_layer_norm")


def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def default_backend() -> str:
    chosen = os.environ.get("KERNELS_BACKEND")
    if chosen:
        if chosen not in BACKENDS:
            raise ValueError(f"KERNELS_BACKEND must be one of {BACKENDS}, got {chosen!r}")
        return chosen
    return "triton" if torch.cuda.is_available() and triton_available() else "reference"


def load_backend(name: str) -> SimpleNamespace:
    if name == "reference":
        module = importlib.import_module(".reference", __package__)
        return SimpleNamespace(name=name, **{op: getattr(module, op + "_ref") for op in OPS})
    if name != "triton":
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    ops = {}
    for module_name, names in (("cache", ["reshape_and_cache", "rotary_and_cache"]),
                               ("prefill", ["paged_prefill_attention"]),
                               ("decode", ["paged_decode_attention"]),
                               ("norm", ["rms_norm", "rms_norm_pair", "embed_rms_norm", "rotary_embedding"]),
                               ("layer_norm", ["add_layer_norm"]),
                               ("ffn", ["ffn_add_layer_norm"]),
                               ("gemv", ["linear_small_m", "logits_small_m", "gelu_tanh_and_mul_gemv"])):
        module = importlib.import_module(f".{module_name}", __package__)
        ops.update({op: getattr(module, op) for op in names})
    return SimpleNamespace(name=name, **ops)


_backend: SimpleNamespace | None = None
_reference: SimpleNamespace | None = None


def backend(tensor: torch.Tensor | None = None) -> SimpleNamespace:
    """The chosen backend; the reference instead where `tensor` is a host tensor that compiled Triton
    kernels cannot read."""
    global _backend, _reference
    if _backend is None:
        _backend = load_backend(default_backend())
    # the interpreter test of kernels.common.interpreting, read here so that dispatch never imports triton
    if (tensor is not None and _backend.name == "triton" and not tensor.is_cuda
            and os.environ.get("TRITON_INTERPRET", "0") != "1"):
        if _reference is None:
            _reference = load_backend("reference")
        return _reference
    return _backend


def set_backend(name: str) -> None:
    """Switch every op to `name` ("triton" or "reference"); for tests and benchmarks."""
    global _backend
    _backend = load_backend(name)


def backend_name() -> str:
    return backend().name


def reshape_and_cache(key, value, k_cache, v_cache, slot_mapping) -> None:
    backend(key).reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def rotary_and_cache(positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache, q_norm=None,
                     k_norm=None, eps: float = 1e-6):
    return backend(positions).rotary_and_cache(positions, q, k, v, k_cache, v_cache, slot_mapping,
                                               cos_sin_cache, q_norm, k_norm, eps)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, *,
                            max_seqlen_q: int, scale: float, sliding_window=None, softcap=None,
                            out=None):
    return backend(q).paged_prefill_attention(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q=max_seqlen_q,
        scale=scale, sliding_window=sliding_window, softcap=softcap, out=out)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, *, scale: float,
                           sliding_window=None, softcap=None, out=None):
    return backend(q).paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=scale,
                                             sliding_window=sliding_window, softcap=softcap, out=out)


def rms_norm(x, weight, eps: float, residual=None, out=None):
    return backend(x).rms_norm(x, weight, eps, residual=residual, out=out)


def add_layer_norm(x, residual, weight, bias, eps: float):
    return backend(x).add_layer_norm(x, residual, weight, bias, eps)


def ffn_add_layer_norm(x, w1, b1, w2, b2, weight, bias, eps: float):
    return backend(x).ffn_add_layer_norm(x, w1, b1, w2, b2, weight, bias, eps)


def rotary_embedding(positions, q, k, cos_sin_cache):
    return backend(positions).rotary_embedding(positions, q, k, cos_sin_cache)


def rms_norm_pair(x, w1, w2, eps: float, residual, residual_settled: bool = False):
    return backend(x).rms_norm_pair(x, w1, w2, eps, residual, residual_settled=residual_settled)


def embed_rms_norm(ids, table, scale: float, weight, eps: float, src_rows=None, prev_tokens=None):
    return backend(ids).embed_rms_norm(ids, table, scale, weight, eps, src_rows=src_rows, prev_tokens=prev_tokens)


def linear_small_m(x, weight, out=None):
    return backend(x).linear_small_m(x, weight, out=out)


def fused_logits() -> bool:
    """Whether the GEMV path computes the logits, their fp32 cast and the soft-cap in one launch
    (logits_small_m); `set_options(fused_logits=False)` keeps the four launches (A/B). Read when the
    model runs, so a captured CUDA graph keeps the choice it was captured with."""
    return kernel_options().fused_logits


def logits_small_m(x, weight, softcap=None, argmax_out=None):
    return backend(x).logits_small_m(x, weight, softcap, argmax_out=argmax_out)


def gelu_tanh_and_mul_gemv(x, gate_up_weight):
    return backend(x).gelu_tanh_and_mul_gemv(x, gate_up_weight)

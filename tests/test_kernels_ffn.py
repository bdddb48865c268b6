"""The narrow FFN block with its residual add and LayerNorm (kernels/ffn.py) against its plain-torch twin.

On CPU the kernel runs under TRITON_INTERPRET=1; on a GPU the same tests run it compiled. Inputs are
fresh random values; x has a nonzero mean and the FFN output is of the order of x, so a kernel that
dropped the residual, the FFN, a bias or the centering would fail; outputs start as NaN where unwritten.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn import functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the @triton.jit decorations

from compress.kernels import dispatch, ffn, reference  # noqa: E402
from compress.kernels.testing import relative_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = 1.5e-2  # bf16 output (8 bits; the interpreter truncates) after two bf16 GEMMs


def _problem(num_rows, hidden, filters, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, hidden, generator=g) + 2.0
    w1 = torch.randn(filters, hidden, generator=g) / hidden ** 0.5
    b1 = torch.randn(filters, generator=g)
    w2 = 2.0 * torch.randn(hidden, filters, generator=g) / filters ** 0.5
    b2 = 0.5 * torch.randn(hidden, generator=g)
    weight = 1.0 + 0.3 * torch.randn(hidden, generator=g)
    bias = 0.2 * torch.randn(hidden, generator=g)
    return tuple(t.to(DEVICE, dtype) for t in (x, w1, b1, w2, b2, weight, bias))


@pytest.mark.parametrize("filters", [1, 8, 24, 64, 100, 128])
@pytest.mark.parametrize("num_rows,hidden", [(37, 128), (5, 384), (20, 768)])
def test_ffn_add_layer_norm_matches_reference(num_rows, hidden, filters):
    x, w1, b1, w2, b2, weight, bias = _problem(num_rows, hidden, filters, seed=filters)
    got = ffn.ffn_add_layer_norm(x, w1, b1, w2, b2, weight, bias, 1e-5)
    want = reference.ffn_add_layer_norm_ref(x, w1, b1, w2, b2, weight, bias, 1e-5)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert relative_error(got, want) < TOLERANCE
    # each part of the block matters at this tolerance: without the FFN, or without the residual
    without_ffn = reference.add_layer_norm_ref(torch.zeros_like(x), x, weight, bias, 1e-5)
    without_residual = reference.add_layer_norm_ref(F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2),
                                                    torch.zeros_like(x), weight, bias, 1e-5)
    assert relative_error(without_ffn, want) > 5 * TOLERANCE
    assert relative_error(without_residual, want) > 5 * TOLERANCE


def test_ffn_add_layer_norm_batched_strided_and_large_mean():
    """[B, S, H] input whose rows are a strided slice, and rows whose mean dwarfs their spread (the
    merged variance must not cancel)."""
    x, w1, b1, w2, b2, weight, bias = _problem(2 * 9, 128, 40, seed=3)
    wide = torch.full((2, 9, 192), float("nan"), device=DEVICE, dtype=x.dtype)
    wide[..., :128] = (x.float() * 0.05 + 60.0).to(x.dtype).view(2, 9, 128)
    x = wide[..., :128]
    got = ffn.ffn_add_layer_norm(x, w1, b1, w2, b2, weight, bias, 1e-5)
    want = reference.ffn_add_layer_norm_ref(x.contiguous(), w1, b1, w2, b2, weight, bias, 1e-5)
    assert got.shape == (2, 9, 128) and got.is_contiguous()
    assert relative_error(got, want) < TOLERANCE


def test_ffn_add_layer_norm_dispatch_and_rejections():
    x, w1, b1, w2, b2, weight, bias = _problem(4, 128, 16)
    dispatch.set_backend("reference")
    try:
        torch.testing.assert_close(dispatch.ffn_add_layer_norm(x, w1, b1, w2, b2, weight, bias, 1e-5),
                                   reference.ffn_add_layer_norm_ref(x, w1, b1, w2, b2, weight, bias, 1e-5))
    finally:
        dispatch.set_backend(dispatch.default_backend())
    assert ffn.supports(768, 128, torch.bfloat16) and not ffn.supports(768, 129, torch.bfloat16)
    assert not ffn.supports(600, 16, torch.bfloat16) and not ffn.supports(768, 16, torch.float32)
    with pytest.raises(ValueError, match="W1"):
        ffn.ffn_add_layer_norm(x, w2, b1, w1, b2, weight, bias, 1e-5)
    with pytest.raises(ValueError, match="dtype"):
        ffn.ffn_add_layer_norm(x.float(), w1.float(), b1.float(), w2.float(), b2.float(), weight.float(),
                               bias.float(), 1e-5)

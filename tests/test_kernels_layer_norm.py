"""The fused residual-add LayerNorm (kernels/layer_norm.py) against its plain-torch twin.

On CPU the kernel runs under TRITON_INTERPRET=1; on a GPU the same tests run it compiled. Inputs are
fresh random values with a nonzero mean (so a variance taken without centering fails), weights and
biases are random, and outputs start as NaN wherever the kernel could leave them unwritten.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the @triton.jit decorations

from compress.kernels import dispatch, layer_norm, reference  # noqa: E402
from compress.kernels.testing import relative_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16: the output rounds to 8 bits (and the triton 3.9 interpreter truncates rather than rounds)
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 2e-3}


def _problem(num_rows, hidden, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(num_rows, hidden, generator=g) + 3.0).to(DEVICE, dtype)
    residual = (2.0 * torch.randn(num_rows, hidden, generator=g) - 1.0).to(DEVICE, dtype)
    weight = (1.0 + 0.3 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    bias = (0.2 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    return x, residual, weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [384, 600, 768, 1024])
@pytest.mark.parametrize("num_rows", [1, 13])
def test_add_layer_norm_matches_reference(num_rows, hidden, dtype):
    x, residual, weight, bias = _problem(num_rows, hidden, dtype)
    got = layer_norm.add_layer_norm(x, residual, weight, bias, 1e-5)
    want = reference.add_layer_norm_ref(x, residual, weight, bias, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    assert relative_error(got, want) < TOLERANCE[dtype]
    # the reference itself is LayerNorm(x + residual): a kernel that skipped the residual would fail
    assert relative_error(reference.add_layer_norm_ref(x, torch.zeros_like(x), weight, bias, 1e-5), want) > 0.1


def test_add_layer_norm_batched_and_strided_rows():
    """[B, S, H] inputs, a residual whose rows are a strided slice, and eps that matters."""
    x, residual, weight, bias = _problem(2 * 7, 96, torch.float32, seed=1)
    x = x.view(2, 7, 96) * 1e-3
    wide = torch.randn(2, 7, 160, device=DEVICE)
    wide[..., :96] = residual.view(2, 7, 96) * 1e-3
    residual = wide[..., :96]                  # row stride 160, not 96
    got = layer_norm.add_layer_norm(x, residual, weight, bias, 1e-5)
    want = reference.add_layer_norm_ref(x, residual, weight, bias, 1e-5)
    assert got.shape == (2, 7, 96) and got.is_contiguous()
    assert relative_error(got, want) < TOLERANCE[torch.float32]
    assert relative_error(reference.add_layer_norm_ref(x, residual, weight, bias, 1e-12), want) > 1e-3


def test_add_layer_norm_matches_torch_layer_norm_module():
    """The twin is what a post-norm encoder computes: nn.LayerNorm(x + residual), in bf16."""
    x, residual, weight, bias = _problem(5, 640, torch.bfloat16, seed=2)
    norm = torch.nn.LayerNorm(640, eps=1e-12).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(weight), norm.bias.copy_(bias)
        want = norm(x + residual)
    got = layer_norm.add_layer_norm(x, residual, norm.weight, norm.bias, 1e-12)
    assert relative_error(got, want) < TOLERANCE[torch.bfloat16]
    if DEVICE == "cpu":  # same reduction code there: bit for bit
        assert torch.equal(reference.add_layer_norm_ref(x, residual, weight, bias, 1e-12), want)


def test_add_layer_norm_rejects_mismatched_inputs():
    x, residual, weight, bias = _problem(3, 64, torch.float32)
    with pytest.raises(ValueError):
        layer_norm.add_layer_norm(x, residual[:2], weight, bias, 1e-5)
    with pytest.raises(ValueError):
        layer_norm.add_layer_norm(x, residual.double(), weight, bias, 1e-5)
    assert layer_norm.add_layer_norm(x[:0], residual[:0], weight, bias, 1e-5).shape == (0, 64)


def test_encoder_fast_path_knows_the_row_limit():
    from compress.arch import fast_path

    assert fast_path.MAX_NORM_HIDDEN == layer_norm.MAX_HIDDEN


def test_launch_config_keeps_eight_elements_per_thread():
    for hidden, (rows, warps) in {384: (2, 4), 600: (1, 4), 768: (1, 4), 1024: (1, 4), 4096: (1, 8)}.items():
        assert layer_norm.launch_config(hidden) == (rows, warps), hidden


def test_dispatch_routes_add_layer_norm_to_the_chosen_backend():
    x, residual, weight, bias = _problem(4, 64, torch.float32)
    previous = dispatch.backend_name()
    try:
        outs = {}
        for name, op in (("triton", layer_norm.add_layer_norm), ("reference", reference.add_layer_norm_ref)):
            dispatch.set_backend(name)
            assert dispatch.backend().add_layer_norm is op
            outs[name] = dispatch.add_layer_norm(x, residual, weight, bias, 1e-5)
    finally:
        dispatch.set_backend(previous)
    assert relative_error(outs["triton"], outs["reference"]) < TOLERANCE[torch.float32]

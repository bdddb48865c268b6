"""Cache writes, fused RMSNorm, rotary embedding, the fused rotary + cache write (Triton vs reference)
and the backend dispatcher.

On CPU the Triton kernels run under TRITON_INTERPRET=1; inputs are fresh random values and outputs
start as NaN (or as random cache contents that must survive where no slot points).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the @triton.jit decorations

from compress.kernels import cache, dispatch, norm, reference  # noqa: E402
from compress.kernels.testing import relative_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (256, 8)])
def test_reshape_and_cache_matches_reference(head_dim, block_size):
    num_tokens, num_kv_heads, num_blocks = 23, 2, 9
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[::5] = -1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    cache.reshape_and_cache(key, value, k_cache, v_cache, slots)
    reference.reshape_and_cache_ref(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    written = slots[slots >= 0]
    assert torch.equal(k_cache.view(-1, num_kv_heads, head_dim)[written], key[slots >= 0])


@pytest.mark.parametrize("hidden,with_residual", [(640, False), (640, True), (1152, True)])
def test_rms_norm_matches_reference(hidden, with_residual):
    x = torch.randn(7, hidden, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(hidden, device=DEVICE) * 0.1
    residual = torch.randn_like(x) if with_residual else None
    out = torch.full_like(x, float("nan"))
    got = norm.rms_norm(x, weight, 1e-6, residual=residual, out=out)
    want = reference.rms_norm_ref(x, weight, 1e-6, residual=residual)
    if with_residual:
        # the triton 3.9 interpreter truncates to bf16 instead of rounding: exact only on the GPU
        assert torch.equal(got[1], want[1]) or (DEVICE == "cpu" and relative_error(got[1], want[1]) < 4e-3)
        got, want = got[0], want[0]
    assert got.data_ptr() == out.data_ptr()
    assert relative_error(got, want) < 8e-3


def _cos_sin_cache(max_position, head_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)


@pytest.mark.parametrize("head_dim", [128, 256])
def test_rotary_embedding_matches_reference(head_dim):
    positions = torch.randint(0, 500, (9,), device=DEVICE)
    q = torch.randn(9, 4, head_dim, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(9, 1, head_dim, device=DEVICE, dtype=torch.bfloat16)
    table = _cos_sin_cache(512, head_dim)
    assert relative_error(reference.rotary_embedding_ref(positions, q.clone(), k.clone(), table)[0], q) > 0.1
    q_ref, k_ref = reference.rotary_embedding_ref(positions, q.clone(), k.clone(), table)
    q_got, k_got = norm.rotary_embedding(positions, q, k, table)
    assert q_got.data_ptr() == q.data_ptr()
    assert relative_error(q_got, q_ref) < 8e-3 and relative_error(k_got, k_ref) < 8e-3


# (GQA group, head_dim, QK-norm): each value of each feature at least once, 8 query heads
ROPE_CACHE_GRID = [(1, 128, False), (2, 256, True), (4, 128, True), (8, 256, False)]


def _rope_cache_problem(group, head_dim, num_tokens=11, num_blocks=600, block_size=16, seed=0):
    """q, k, v as strided views of one qkv row (as the fused projection gives them), random caches."""
    torch.manual_seed(seed)
    num_q, num_kv = 8, 8 // group
    qkv = torch.randn(num_tokens, (num_q + 2 * num_kv) * head_dim, device=DEVICE, dtype=torch.bfloat16)
    q, k, v = qkv.split([num_q * head_dim, num_kv * head_dim, num_kv * head_dim], -1)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in (q, k, v))
    shape = (num_blocks, block_size, num_kv, head_dim)
    caches = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16), torch.randn(shape, device=DEVICE,
                                                                                  dtype=torch.bfloat16)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[num_tokens - 1] = num_blocks * block_size - 1      # the very last slot of the cache
    slots[1::4] = -1
    positions = torch.randint(0, 500, (num_tokens,), device=DEVICE)
    return positions, q, k, v, caches, slots


@pytest.mark.parametrize("group,head_dim,qk_norm", ROPE_CACHE_GRID)
def test_rotary_and_cache_matches_reference(group, head_dim, qk_norm):
    positions, q, k, v, (k_cache, v_cache), slots = _rope_cache_problem(group, head_dim)
    table = _cos_sin_cache(512, head_dim)
    norms = (torch.randn(head_dim, device=DEVICE) * 0.3, torch.randn(head_dim, device=DEVICE) * 0.3) \
        if qk_norm else (None, None)
    k_in, v_in = k.clone(), v.clone()
    q_ref, k_ref, v_ref = q.clone(), k_cache.clone(), v_cache.clone()
    reference.rotary_and_cache_ref(positions, q_ref, k, v, k_ref, v_ref, slots, table, *norms, 1e-6)
    assert relative_error(q_ref, q) > 0.1                    # the reference did rotate q
    got = cache.rotary_and_cache(positions, q, k, v, k_cache, v_cache, slots, table, *norms, 1e-6)
    assert got.data_ptr() == q.data_ptr() and torch.equal(k, k_in) and torch.equal(v, v_in)
    assert relative_error(q, q_ref) < 8e-3
    kept = slots >= 0
    flat = [c.view(-1, *c.shape[2:]) for c in (k_cache, v_cache, k_ref, v_ref)]
    assert relative_error(flat[0][slots[kept]], flat[2][slots[kept]]) < 8e-3
    assert torch.equal(flat[1], flat[3])                     # v is a copy: exact
    untouched = torch.ones(flat[0].shape[0], dtype=torch.bool, device=DEVICE)
    untouched[slots[kept]] = False
    assert torch.equal(flat[0][untouched], flat[2][untouched])


@pytest.mark.parametrize("head_dim", [128, 256])
def test_rotary_and_cache_equals_the_two_launches_it_replaces(head_dim):
    """Without QK-norm the fused kernel rounds where rotary_embedding + reshape_and_cache did."""
    positions, q, k, v, (k_cache, v_cache), slots = _rope_cache_problem(4, head_dim, num_blocks=40, seed=1)
    table = _cos_sin_cache(512, head_dim)
    q2, k2, k_cache2, v_cache2 = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
    norm.rotary_embedding(positions, q2, k2, table)
    cache.reshape_and_cache(k2, v, k_cache2, v_cache2, slots)
    cache.rotary_and_cache(positions, q, k, v, k_cache, v_cache, slots, table)
    exact = DEVICE == "cpu"                                  # on the GPU, FMA contraction may differ
    for got, want in ((q, q2), (k_cache, k_cache2), (v_cache, v_cache2)):
        assert torch.equal(got, want) if exact else relative_error(got, want) < 4e-3


@pytest.mark.gpu
def test_rotary_and_cache_large_block_count_uses_int64_offsets():
    """A cache past 2**31 elements: the last slot's offset wraps in 32 bits."""
    num_blocks = 2 ** 31 // (16 * 2 * 256) + 17
    positions, q, k, v, (k_cache, v_cache), slots = _rope_cache_problem(4, 256, num_blocks=num_blocks)
    table = _cos_sin_cache(512, 256)
    kept = slots[slots >= 0]
    rows = [c.view(-1, *c.shape[2:]) for c in (k_cache, v_cache)]
    before = [r[kept].clone() for r in rows]
    q_ref, k_ref, v_ref = q.clone(), torch.zeros_like(before[0]), torch.zeros_like(before[1])
    # the reference writes into small caches with one slot per kept token (4 GiB copies would not fit twice)
    small_slots = torch.full_like(slots, -1)
    small_slots[slots >= 0] = torch.arange(len(kept), device=DEVICE)
    reference.rotary_and_cache_ref(positions, q_ref, k, v, k_ref[:, None], v_ref[:, None], small_slots, table)
    cache.rotary_and_cache(positions, q, k, v, k_cache, v_cache, slots, table)
    assert kept.max() * 2 * 256 >= 2 ** 31                   # the last slot is past int32 offsets
    assert relative_error(q, q_ref) < 8e-3 and torch.equal(rows[1][kept], v_ref)
    assert relative_error(rows[0][kept], k_ref) < 8e-3 and relative_error(rows[0][kept], before[0]) > 0.1


def test_dispatcher_picks_reference_without_cuda(monkeypatch):
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    expected = "triton" if torch.cuda.is_available() else "reference"
    assert dispatch.default_backend() == expected
    monkeypatch.setenv("KERNELS_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="KERNELS_BACKEND"):
        dispatch.default_backend()


def test_dispatcher_runs_both_backends_on_the_same_inputs():
    x = torch.randn(3, 64, device=DEVICE, dtype=torch.float32)
    weight = torch.randn(64, device=DEVICE)
    results = {}
    for name in dispatch.BACKENDS:
        dispatch.set_backend(name)
        assert dispatch.backend_name() == name
        results[name] = dispatch.rms_norm(x, weight, 1e-6)
    dispatch.set_backend(dispatch.default_backend())
    diff = (results["triton"] - results["reference"]).abs()
    print(f"rms_norm triton vs reference: max {diff.max():.2e} mean {diff.mean():.2e}")
    assert relative_error(results["triton"], results["reference"]) < 1e-5

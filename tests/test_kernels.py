"""Paged attention kernels (Triton) against their plain-torch references over a grid of shapes.

On CPU the Triton kernels run under TRITON_INTERPRET=1 on a small grid (pairwise coverage of the
features); the full cartesian grid runs when CUDA is available or KERNELS_FULL_GRID=1. Inputs are fresh
random values, unused and stale cache slots hold NaN, outputs are poisoned with NaN before each call.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the @triton.jit decorations

from compress.kernels import DecodeConfig, decode, prefill, reference, using_options  # noqa: E402
from compress.kernels.testing import make_paged_problem, relative_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL_GRID = torch.cuda.is_available() or os.environ.get("KERNELS_FULL_GRID") == "1"
NUM_HEADS = 8
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-3}

# (group, head_dim, sliding_window, softcap): the CPU grid covers every value of each feature
SMALL_GRID = [(1, 128, None, None), (2, 256, 24, 50.0), (4, 128, 40, None), (8, 256, None, 50.0)]
FULL = list(itertools.product([1, 2, 4, 8], [128, 256], [None, 24], [None, 50.0]))
GRID = FULL if FULL_GRID else SMALL_GRID
DTYPES = [torch.bfloat16, torch.float16] if FULL_GRID else [torch.bfloat16]

# Mixed context lengths that land on, just before and just after block boundaries (block_size 16).
DECODE_CONTEXTS = [1, 15, 16, 17, 100, 257]
PREFILL_CASES = [(0, 1), (0, 37), (16, 16), (47, 1), (5, 70), (130, 9)]  # (cached prefix, new tokens)


def scale_for(head_dim, softcap):
    """Scores of std ~sqrt(D) under a soft-cap, so tanh bends them (at std 1 a cap of 50 is a no-op)."""
    return 1.0 if softcap is not None else head_dim ** -0.5


def check(out, ref, dtype, label):
    err = relative_error(out, ref)
    diff = (out.double() - ref.double()).abs()
    print(f"{label}: rel {err:.2e} max {diff.max():.2e} mean {diff.mean():.2e}")
    assert err < TOLERANCE[dtype], f"{label}: relative error {err:.3e}"


def run_decode(group, head_dim, window, softcap, dtype, contexts, block_size=16, first_block=0):
    problem = make_paged_problem([c - 1 for c in contexts], [1] * len(contexts), num_heads=NUM_HEADS,
                                 num_kv_heads=NUM_HEADS // group, head_dim=head_dim,
                                 block_size=block_size, sliding_window=window, dtype=dtype,
                                 device=DEVICE, first_block=first_block,
                                 seed=group * 1000 + head_dim + (window or 0) + int(softcap or 0))
    args = (problem.q, problem.k_cache, problem.v_cache, problem.block_tables, problem.seq_lens)
    kwargs = dict(scale=scale_for(head_dim, softcap), sliding_window=window, softcap=softcap)
    out = torch.full_like(problem.q, float("nan"))
    decode.paged_decode_attention(*args, **kwargs, out=out)
    ref = reference.paged_decode_attention_ref(*args, **kwargs)
    check(out, ref, dtype, f"decode g{group} d{head_dim} w{window} cap{softcap} {dtype}")


def run_prefill(group, head_dim, window, softcap, dtype, cases, block_size=16):
    problem = make_paged_problem([c for c, _ in cases], [n for _, n in cases], num_heads=NUM_HEADS,
                                 num_kv_heads=NUM_HEADS // group, head_dim=head_dim,
                                 block_size=block_size, sliding_window=window, dtype=dtype,
                                 device=DEVICE, seed=group * 999 + head_dim + (window or 3) + int(softcap or 0))
    args = (problem.q, problem.k_cache, problem.v_cache, problem.block_tables, problem.cu_seqlens_q,
            problem.seq_lens)
    kwargs = dict(max_seqlen_q=problem.max_seqlen_q, scale=scale_for(head_dim, softcap), sliding_window=window,
                  softcap=softcap)
    out = torch.full_like(problem.q, float("nan"))
    prefill.paged_prefill_attention(*args, **kwargs, out=out)
    ref = reference.paged_prefill_attention_ref(*args, **kwargs)
    check(out, ref, dtype, f"prefill g{group} d{head_dim} w{window} cap{softcap} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim,window,softcap", GRID)
def test_paged_decode_matches_reference(group, head_dim, window, softcap, dtype):
    run_decode(group, head_dim, window, softcap, dtype, DECODE_CONTEXTS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim,window,softcap", GRID)
def test_paged_prefill_matches_reference(group, head_dim, window, softcap, dtype):
    run_prefill(group, head_dim, window, softcap, dtype, PREFILL_CASES)


def test_decode_single_split_and_odd_block_size():
    """block_size 8 and a context of one tile: the kernel writes the output without the reduction."""
    run_decode(2, 128, None, None, torch.float32, [3, 9, 40], block_size=8)


def test_decode_splits_merged_by_the_reduction(monkeypatch):
    """Batch 2 over a long context (many splits, as in batch-1 decode): the split kernel writes partials
    and one reduction launch per call, grid (batch, q_head), merges them."""
    launches = []

    class Spy:
        def __getitem__(self, grid, _kernel=decode.paged_decode_reduce_kernel):
            launches.append(grid)
            return _kernel[grid]
    monkeypatch.setattr(decode, "paged_decode_reduce_kernel", Spy())
    # as many splits as the context allows (35 here), as at batch 1
    monkeypatch.setattr(decode, "DECODE_CONFIG", replace(decode.DECODE_CONFIG, programs_per_sm=16.0))
    for group, window, contexts in ((2, 100, [300, 37]), (8, None, [1100, 37])):
        run_decode(group, 128, window, 50.0, torch.bfloat16, contexts, block_size=16)
    assert launches == [(2, NUM_HEADS, 2)] * 2       # head_dim 128 in two column blocks


@pytest.mark.parametrize("group,head_dim,window,softcap", SMALL_GRID)
def test_decode_batch_one(group, head_dim, window, softcap):
    """Batch 1 launches with its own config (BATCH1_DECODE_CONFIG, smaller tiles): one sequence at a time,
    from one token through a context of many tiles and splits."""
    assert decode.decode_config(1) is decode.BATCH1_DECODE_CONFIG
    for context in (1, 17, 577):
        run_decode(group, head_dim, window, softcap, torch.bfloat16, [context])


def test_decode_launches_with_the_decode_config_option(monkeypatch):
    """`set_options(decode_config=...)` (kernels/options.py) replaces the tuned config at batch 1 and
    above, and the results still match the reference."""
    launches = []

    class Spy:
        def __getitem__(self, grid, _kernel=decode.paged_decode_split_kernel):
            def launch(*args, **kwargs):
                launches.append((grid[2], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]))
                return _kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(decode, "paged_decode_split_kernel", Spy())
    with using_options(decode_config=DecodeConfig(block_n=64, num_warps=2, num_stages=1, programs_per_sm=1.0)):
        run_decode(2, 128, None, 50.0, torch.bfloat16, [300])
        run_decode(2, 128, 100, None, torch.bfloat16, [300, 37])
    run_decode(2, 128, None, 50.0, torch.bfloat16, [300])
    # splits (device_sms is 8 on the CPU, 4 KV heads): 1 program per SM gives 2 at batch 1 and 1 at
    # batch 2; the tuned batch-1 config (2 per SM, tiles of 16) gives 4
    assert launches == [(2, 64, 2, 1), (1, 64, 2, 1), (4, 16, 4, 2)]


@pytest.mark.parametrize("window", [None, 100])
def test_decode_reduce_reads_only_the_splits_that_had_tiles(window):
    """The reduction merges the splits the split kernel gave tiles to (from seq_lens, the window and the
    tile size) and never loads the others: they hold NaN here, and the result must stay finite."""
    splits, block_n, head_dim = 16, 32, 128
    seq_lens = [1, 33, 70, 600]               # 1, 2, 3 and 19 tiles (4 with the window): 1-2 per split
    gen = torch.Generator().manual_seed(7)
    part_out = torch.randn(len(seq_lens), NUM_HEADS, splits, head_dim, generator=gen)
    part_lse = torch.randn(len(seq_lens), NUM_HEADS, splits, generator=gen) * 4
    expected = torch.empty(len(seq_lens), NUM_HEADS, head_dim)
    for b, length in enumerate(seq_lens):
        tiles = -(-(min(length, window or length)) // block_n)
        active = -(-tiles // -(-tiles // splits))
        part_out[b, :, active:], part_lse[b, :, active:] = float("nan"), float("nan")
        weight = torch.softmax(part_lse[b, :, :active] * torch.log(torch.tensor(2.0)), dim=-1)
        expected[b] = (weight[..., None] * part_out[b, :, :active]).sum(1)
    out = torch.full((len(seq_lens), NUM_HEADS, head_dim), float("nan"), device=DEVICE)
    decode.merge_splits(part_out.to(DEVICE), part_lse.to(DEVICE), torch.tensor(seq_lens, dtype=torch.int32,
                        device=DEVICE), out, sliding_window=window, block_n=block_n)
    check(out.cpu(), expected, torch.float32, f"reduce w{window}")


def test_prefill_long_window_chunk_with_prefix():
    """A chunk much longer than the window on top of a cached prefix: tiles skip stale blocks."""
    run_prefill(4, 128, 16, 50.0, torch.bfloat16, [(64, 150), (3, 1)])


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [128, 256])
def test_large_block_count_uses_int64_offsets(head_dim):
    """Physical block ids past 2**31 / (block_size * Hkv * D): 32-bit offsets would wrap."""
    first_block = 2 ** 31 // (16 * 4 * head_dim) + 17
    run_decode(2, head_dim, None, 50.0, torch.bfloat16, [33, 200], first_block=first_block)
    problem_cases = [(40, 30), (0, 5)]
    run_prefill_high(head_dim, problem_cases, first_block)


def run_prefill_high(head_dim, cases, first_block):
    problem = make_paged_problem([c for c, _ in cases], [n for _, n in cases], num_heads=8,
                                 num_kv_heads=4, head_dim=head_dim, device=DEVICE,
                                 first_block=first_block)
    args = (problem.q, problem.k_cache, problem.v_cache, problem.block_tables, problem.cu_seqlens_q,
            problem.seq_lens)
    kwargs = dict(max_seqlen_q=problem.max_seqlen_q, scale=0.1, sliding_window=None, softcap=None)
    out = torch.full_like(problem.q, float("nan"))
    prefill.paged_prefill_attention(*args, **kwargs, out=out)
    check(out, reference.paged_prefill_attention_ref(*args, **kwargs), torch.bfloat16,
          f"prefill int64 d{head_dim}")

"""Small-batch GEMV kernels and the fused norm pair (Triton vs their plain-torch twins), and a slimmed
model served on the fast path with those kernels.

On CPU the kernels run under TRITON_INTERPRET=1 (which truncates to bf16 instead of rounding, hence
the bf16 tolerances); inputs are fresh random values, outputs start as NaN. CPU torch here has no bf16
GEMM, so bf16 references are computed in fp32 from the same bf16 values and rounded once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the @triton.jit decorations

from compress.kernels import dispatch, gemv, norm, reference  # noqa: E402
from compress.kernels.common import next_pow2, ticket_counters  # noqa: E402
from compress.kernels.testing import relative_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.2e-2}
# (BLOCK_N, BLOCK_K): neither divides N = 77 or K = 300, so every edge mask is exercised
CONFIGS = [gemv.GemvConfig(2, 128), gemv.GemvConfig(8, 64), gemv.GemvConfig(1, 512)]


def _inputs(num_rows, n, k, dtype, scale=1.0):
    x = (torch.randn(num_rows, k, device=DEVICE) * scale).to(dtype)
    weight = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    return x, weight


def _ref(fn, x, weight, *args):
    """The reference in fp32 from the same (possibly bf16) values, rounded once to x.dtype."""
    return fn(x.float(), weight.float(), *args).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 6])
def test_linear_small_m_matches_reference(num_rows, dtype):
    x, weight = _inputs(num_rows, 77, 300, dtype)
    want = _ref(reference.linear_small_m_ref, x, weight)
    out = torch.full((num_rows, 77), float("nan"), device=DEVICE, dtype=dtype)
    got = gemv.linear_small_m(x, weight, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert relative_error(got, want) < TOLERANCE[dtype]
    for config in CONFIGS:
        out.fill_(float("nan"))
        gemv.launch(gemv.linear_small_m_kernel, x, weight, out, 77, config)
        assert relative_error(out, want) < TOLERANCE[dtype], config


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 3])
def test_logits_small_m_matches_product_float_and_softcap(num_rows, dtype, softcap):
    """The decode step's logits in one launch: fp32, the product rounded to x.dtype first, then capped.
    Large logits (scale 8) so the cap of 30 bends them."""
    x, weight = _inputs(num_rows, 77, 300, dtype, scale=8.0)
    got = gemv.logits_small_m(x, weight, softcap)
    assert got.dtype == torch.float32
    product = gemv.linear_small_m(x, weight).float()        # the rounding the kernel reproduces
    want = product if softcap is None else softcap * torch.tanh(product / softcap)
    assert (got - want).abs().max() < 1e-4 * (softcap or want.abs().max())
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    if softcap is not None:
        assert got.abs().max() < softcap and product.abs().max() > softcap / 2
    ref = reference.logits_small_m_ref(x.float(), weight.float(), softcap)
    assert relative_error(got, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("num_rows", [1, 3, 5])
def test_logits_small_m_argmax_is_torch_argmax_of_its_logits(num_rows, softcap):
    """The argmax the logits kernel adds (atomic maxima of packed value|index, then a finish launch)
    is torch.argmax of the same logits: ties go to the first index, all-negative rows work, and the
    persistent slots are reset between launches."""
    x, weight = _inputs(num_rows, 77, 300, torch.bfloat16, scale=8.0)
    weight[4] = (x[0].float() * 0.01).to(weight.dtype)        # row 0's maximum at 4, tied at 5 (the same
    weight[5], weight[33], weight[60] = weight[4], weight[4], weight[4]     # tile), 33 and 60 (others)
    cases = [(x, weight), (x.abs(), -weight.abs()), (x, weight.flip(0))]   # all-negative logits; the tie reversed
    for x_i, w_i in cases * 2:                                # twice: the slots must come back reset
        tokens = torch.full((num_rows,), -1, dtype=torch.int64, device=DEVICE)
        logits = gemv.logits_small_m(x_i, w_i, softcap, argmax_out=tokens)
        assert torch.equal(tokens, logits.argmax(-1)), (tokens, logits.argmax(-1))
    first = gemv.logits_small_m(x, weight, softcap)
    assert first[0, 4] == first[0, 5] == first[0, 33] == first[0, 60] == first[0].max()
    assert gemv.argmax_slots(torch.device(DEVICE), num_rows).eq(torch.iinfo(torch.int64).min).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 3, 4, 5])
def test_gelu_tanh_and_mul_gemv_matches_reference(num_rows, dtype):
    # scale 4 pushes gate pre-activations to |g| ~ 10, into both tails of tanh
    x, weight = _inputs(num_rows, 2 * 45, 200, dtype, scale=4.0)
    want = _ref(reference.gelu_tanh_and_mul_gemv_ref, x, weight)
    got = gemv.gelu_tanh_and_mul_gemv(x, weight)
    assert got.shape == (num_rows, 45) and got.dtype == dtype
    assert relative_error(got, want) < TOLERANCE[dtype]
    # the halves are not interchangeable: swapping gate and up must change the result
    swapped = torch.cat([weight[45:], weight[:45]])
    assert relative_error(gemv.gelu_tanh_and_mul_gemv(x, swapped), want) > 0.1
    out = torch.full((num_rows, 45), float("nan"), device=DEVICE, dtype=dtype)
    for config in CONFIGS:
        out.fill_(float("nan"))
        gemv.launch(gemv.gelu_tanh_and_mul_gemv_kernel, x, weight, out, 45, config)
        assert relative_error(out, want) < TOLERANCE[dtype], config


# K = 300: 3 splits of 192 + 108 columns; 3 splits of one tile each; 4 splits of 3 tiles (the last empty)
SPLIT_K_CONFIGS = [gemv.GemvConfig(2, 64, split_k=2), gemv.GemvConfig(4, 128, 4, 1, split_k=3),
                   gemv.GemvConfig(1, 128, 2, 3, split_k=4)]


@pytest.mark.parametrize("num_rows,dtype", [(1, torch.bfloat16), (6, torch.float32)])
def test_linear_split_k_matches_reference_and_resets_its_tickets(num_rows, dtype):
    x, weight = _inputs(num_rows, 21, 300, dtype)
    want = _ref(reference.linear_small_m_ref, x, weight)
    out = torch.full((num_rows, 21), float("nan"), device=DEVICE, dtype=dtype)
    for config in SPLIT_K_CONFIGS:
        out.fill_(float("nan"))
        gemv.launch(gemv.linear_small_m_kernel, x, weight, out, 21, config)
        assert relative_error(out, want) < TOLERANCE[dtype], config
        # tickets back at 0: a CUDA graph replays the same launch over the same counters
        assert not ticket_counters(out.device).any(), config
    first = out.clone()
    gemv.launch(gemv.linear_small_m_kernel, x, weight, out, 21, SPLIT_K_CONFIGS[-1])
    assert torch.equal(out, first)                            # the partials are summed in a fixed order
    with pytest.raises(ValueError, match="split_k"):
        gemv.launch(gemv.gelu_tanh_and_mul_gemv_kernel, x, weight, out[:, :10], 10, SPLIT_K_CONFIGS[0])


def test_linear_small_m_uses_a_split_k_table_entry(monkeypatch):
    x, weight = _inputs(1, 40, 96, torch.float32)
    monkeypatch.setitem(gemv.LINEAR_CONFIGS, (1, 40, 96), gemv.GemvConfig(8, 32, split_k=3))
    seen = []
    original = gemv._launch_split_k
    monkeypatch.setattr(gemv, "_launch_split_k", lambda *a: seen.append(a[-1]) or original(*a))
    got = gemv.linear_small_m(x, weight)
    assert seen == [gemv.LINEAR_CONFIGS[(1, 40, 96)]]
    assert relative_error(got, _ref(reference.linear_small_m_ref, x, weight)) < TOLERANCE[torch.float32]


def test_gemv_with_strided_rows_and_large_row_stride():
    """x rows taken from a wider buffer (as hidden[rows] views can be) and a weight slice of a wider matrix."""
    base_x = torch.randn(3, 400, device=DEVICE)
    base_w = torch.randn(50, 1000, device=DEVICE)
    x, weight = base_x[:, :300], base_w[:, 100:400]
    want = reference.linear_small_m_ref(x.contiguous(), weight.contiguous())
    assert relative_error(gemv.linear_small_m(x, weight), want) < 1e-5


def test_empty_shapes_of_slimmed_layers():
    """0 heads / 0 filters: K == 0 gives zeros (not NaN from an unwritten buffer), N == 0 gives nothing."""
    x = torch.randn(2, 0, device=DEVICE)
    out = torch.full((2, 64), float("nan"), device=DEVICE)
    got = gemv.linear_small_m(x, torch.randn(64, 0, device=DEVICE), out=out)
    assert torch.equal(got, torch.zeros(2, 64, device=DEVICE))
    x64, no_filters = torch.randn(2, 64, device=DEVICE), torch.randn(0, 64, device=DEVICE)
    assert gemv.gelu_tanh_and_mul_gemv(x64, no_filters).shape == (2, 0)
    assert gemv.linear_small_m(x64[:0], torch.randn(8, 64, device=DEVICE)).shape == (0, 8)
    with pytest.raises(ValueError, match="even"):
        gemv.gelu_tanh_and_mul_gemv(torch.randn(1, 8, device=DEVICE), torch.randn(5, 8, device=DEVICE))
    with pytest.raises(ValueError, match="K"):
        gemv.linear_small_m(torch.randn(1, 8, device=DEVICE), torch.randn(5, 9, device=DEVICE))


def test_launch_configs_are_valid():
    for table in (gemv.LINEAR_CONFIGS, gemv.GEGLU_CONFIGS):
        for (rows, n, k), config in table.items():
            assert rows in (1, 2, 4) and n > 0 and k > 0
            assert all(v & (v - 1) == 0 for v in (config.block_n, config.block_k, config.num_warps))
    for rows in range(1, 7):
        for n, k in ((4096, 2304), (2304, 9216), (7, 3), (256000, 2304)):
            config = gemv.default_config(rows, n, k)
            assert gemv.rows_bucket(rows) * config.block_n * config.block_k <= 2048
            assert config.block_k <= next_pow2(k) and config.block_n <= next_pow2(n)
    assert gemv.pick_config(gemv.LINEAR_CONFIGS, 1, 4096, 2304) is gemv.LINEAR_CONFIGS[(1, 4096, 2304)]
    assert gemv.pick_config(gemv.LINEAR_CONFIGS, 3, 7, 3) == gemv.default_config(4, 7, 3)


@pytest.mark.parametrize("dtype,hidden", [(torch.float32, 640), (torch.bfloat16, 640), (torch.bfloat16, 1152)])
def test_rms_norm_pair_matches_two_norms(dtype, hidden):
    x = torch.randn(5, hidden, device=DEVICE, dtype=dtype) * 3
    residual = torch.randn_like(x)
    w1, w2 = torch.randn(hidden, device=DEVICE) * 0.3, torch.randn(hidden, device=DEVICE) * 0.3
    out, summed = norm.rms_norm_pair(x, w1, w2, 1e-6, residual)
    settled = norm.rms_norm_pair(x, w1, w2, 1e-6, residual, residual_settled=True)   # loaded before the wait
    assert torch.equal(settled[0], out) and torch.equal(settled[1], summed)
    want_out, want_sum = reference.rms_norm_pair_ref(x, w1, w2, 1e-6, residual)
    first = reference.rms_norm_ref(x, w1, 1e-6)
    assert torch.equal(want_sum, first + residual)       # the twin is the two norms it replaces
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert relative_error(summed, want_sum) < tol and relative_error(out, want_out) < tol
    # against the two Triton launches it replaces: the same roundings, so the same bits (fp32 on the GPU
    # may contract norm1's product and the residual add into one FMA, hence a tolerance there)
    two_out, two_sum = norm.rms_norm(norm.rms_norm(x, w1, 1e-6), w2, 1e-6, residual=residual)
    if dtype == torch.bfloat16 or DEVICE == "cpu":
        assert torch.equal(summed, two_sum) and torch.equal(out, two_out)
    assert relative_error(summed, two_sum) < 1e-6 and relative_error(out, two_out) < 1e-6


@pytest.mark.parametrize("dtype,hidden", [(torch.float32, 640), (torch.bfloat16, 1152)])
@pytest.mark.parametrize("ahead", [False, True])
def test_embed_rms_norm_matches_embedding_scale_and_norm(dtype, hidden, ahead):
    """One launch for the embedding, the sqrt(hidden) scale and the first norm; in a step launched ahead,
    rows with a source row take the previous step's token instead of their (stale) id."""
    vocab, rows = 300, 6
    table = torch.randn(vocab, hidden, device=DEVICE).to(dtype)
    weight = torch.randn(hidden, device=DEVICE) * 0.3
    ids = torch.randint(0, vocab, (rows,), device=DEVICE, dtype=torch.int32)
    scale = torch.tensor(hidden ** 0.5, dtype=dtype).item()
    src_rows = prev = None
    want_ids = ids.long()
    if ahead:
        src_rows = torch.tensor([2, -1, 0, 4, -1, 1], device=DEVICE, dtype=torch.int32)
        prev = torch.randint(0, vocab, (8,), device=DEVICE)
        want_ids = torch.where(src_rows >= 0, prev[src_rows.long().clamp(min=0)], want_ids)
    out, summed = norm.embed_rms_norm(ids, table, scale, weight, 1e-6, src_rows=src_rows, prev_tokens=prev)
    want_out, want_sum = reference.embed_rms_norm_ref(ids, table, scale, weight, 1e-6, src_rows, prev)
    assert torch.equal(want_sum, table[want_ids] * torch.tensor(scale, dtype=dtype))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert relative_error(summed, want_sum) < tol and relative_error(out, want_out) < tol
    if DEVICE == "cuda":      # the interpreter truncates to bf16; compiled kernels round like torch
        assert torch.equal(summed, want_sum) and torch.equal(out, norm.rms_norm(want_sum, weight, 1e-6))


def test_dispatcher_runs_new_ops_on_both_backends():
    x, weight = _inputs(2, 48, 64, torch.float32)
    residual, w = torch.randn(2, 64, device=DEVICE), torch.randn(64, device=DEVICE) * 0.1
    results = {}
    for name in dispatch.BACKENDS:
        dispatch.set_backend(name)
        results[name] = (dispatch.linear_small_m(x, weight), dispatch.gelu_tanh_and_mul_gemv(x, weight),
                         *dispatch.rms_norm_pair(x[:, :64], w, w.flip(0), 1e-6, residual))
    dispatch.set_backend(dispatch.default_backend())
    for got, want in zip(results["triton"], results["reference"]):
        print(f"triton vs reference: max {(got - want).abs().max():.2e}")
        assert relative_error(got, want) < 1e-5


def test_dispatcher_runs_host_tensors_on_the_reference_unless_interpreting(monkeypatch):
    """Compiled Triton kernels cannot read host memory: with the interpreter off, an op on CPU tensors (an
    engine pinned to the CPU on a GPU machine) runs the reference even where the backend is Triton."""
    x, weight = (t.cpu() for t in _inputs(2, 48, 64, torch.float32))
    dispatch.set_backend("triton")
    try:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert dispatch.backend().name == "triton" and dispatch.backend(x).name == "reference"
        assert torch.equal(dispatch.linear_small_m(x, weight), reference.linear_small_m_ref(x, weight))
        assert torch.equal(dispatch.gelu_tanh_and_mul_gemv(x, weight),
                           reference.gelu_tanh_and_mul_gemv_ref(x, weight))
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert dispatch.backend(x).name == "triton"
    finally:
        dispatch.set_backend(dispatch.default_backend())


SLIM_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from safetensors.torch import save_file
from compress import kernels
from compress.kernels import dispatch
from serve import LLM, SamplingParams
from serve_fixtures import gemma3_config, hf_greedy, random_model, random_prompts, save_model
from test_engine_slimmed import KEEP, mask_dense, slim_state_dict
model = random_model(gemma3_config(), seed=11)
path = save_model(model, {path!r}, extra_config={{
    "num_attention_heads_per_layer": [len(KEEP[i][0]) for i in range(4)],
    "num_key_value_heads_per_layer": [len(KEEP[i][1]) for i in range(4)],
    "intermediate_size_per_layer": [len(KEEP[i][2]) for i in range(4)]}})
for f in path.glob("*.safetensors"):
    f.unlink()
save_file(slim_state_dict(model), str(path / "model.safetensors"), metadata={{"format": "pt"}})
mask_dense(model)
prompts = random_prompts([5, 19, 27], seed=4)
expected = [hf_greedy(model, p, 6) for p in prompts]
assert kernels.backend_name() == "triton"
calls = {{"linear_small_m": 0, "gelu_tanh_and_mul_gemv": 0, "rms_norm_pair": 0, "rotary_and_cache": 0}}
ops = dispatch.backend()
for name in calls:
    def counted(*a, _fn=getattr(ops, name), _name=name, **kw):
        calls[_name] += 1
        return _fn(*a, **kw)
    setattr(ops, name, counted)
llm = LLM(path, block_size=4, max_num_batched_tokens=12, fast_path="on", max_graph_batch=4)
got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))]
assert got == expected, (got, expected)
assert all(calls.values()), calls
print("same tokens", calls)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check for CPU machines; on a GPU the `gpu` "
                    "engine test in test_engine_fast_path.py runs the compiled kernels (triton 3.6's interpreter "
                    "fails on this script's int conversions)")
def test_slimmed_model_fast_path_with_triton_gemv_matches_hf(tmp_path):
    """Uneven slimmed Gemma 3 (a 0-head layer, a 0-filter layer, odd widths) on the fast path with the
    Triton kernels (interpreted on CPU): GEMV for decode steps, GEMM for prefill, norm pairs throughout."""
    pytest.importorskip("triton")
    script = SLIM_SCRIPT.format(tests=str(Path(__file__).parent), path=str(tmp_path / "slim"))
    env = {**os.environ, "KERNELS_BACKEND": "triton", "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "same tokens" in proc.stdout


COMPILE_SCRIPT = """
import sys
sys.path.insert(0, "evals/lab")
from sass_summary import compile_sm90
from compress.kernels import gemv
# every row bucket's GEMVs without PDL (tests/test_kernels_pdl.py compiles the batch-1 ones, and the other
# decode kernels, with it), the table's configs and the defaults of shapes outside it
configs = {(4, 4096, 2304), (2, 18432, 2304)} | set(gemv.LINEAR_CONFIGS)
for rows, n, k in sorted(configs):
    config = gemv.LINEAR_CONFIGS.get((rows, n, k)) or gemv.default_config(rows, n, k)
    consts = {"BLOCK_M": rows, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k}
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    for fn in (gemv.linear_small_m_kernel, gemv.gelu_tanh_and_mul_gemv_kernel):
        compile_sm90(fn, consts, options, pdl=False)
for split_k, rows in ((2, 1), (3, 4)):
    compile_sm90(gemv.linear_split_k_kernel, {"BLOCK_M": rows, "BLOCK_N": 4, "BLOCK_K": 256, "SPLIT_K": split_k},
                 {"num_warps": 4, "num_stages": 3}, pdl=False)
for argmax in (False, True):
    compile_sm90(gemv.logits_small_m_kernel, {"BLOCK_M": 4, "BLOCK_N": 8, "BLOCK_K": 256, "USE_SOFTCAP": True,
                                              "ARGMAX": argmax}, {"num_warps": 4}, pdl=False,
                 types={"out_ptr": "*fp32"})
print("compiled")
"""


def test_kernels_compile_for_sm90_without_a_gpu(compile_env):
    """The interpreter accepts code the compiler rejects (e.g. a plain-float global read in a kernel):
    compile the new kernels for an H100 ahead of time, no device needed."""
    pytest.importorskip("triton.backends.nvidia")
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True,
                          env=compile_env, timeout=240, cwd=Path(__file__).resolve().parents[1])     # the script imports evals/lab/sass_summary.py
    if proc.returncode != 0 and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("this triton has no bundled ptxas")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled" in proc.stdout

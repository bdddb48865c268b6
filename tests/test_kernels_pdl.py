"""Programmatic Dependent Launch (PDL) of the decode-step kernels (kernels/common.py, docs/kernels.md "PDL").

A kernel launched with launch_pdl may start before the previous kernel has finished, so it must wait
(`pdl_wait`, i.e. gdc_wait) before it reads anything the kernel just before it wrote and before it
writes anything (an earlier kernel may still be reading the buffer). On CPU: the switch, a check of
every such kernel's source text, and the PTX each compiles to for an H100 (the wait before every
global store; weights, the step's metadata and a settled residual loaded before it). On the GPU
(`gpu` marker): the kernels and a Gemma-2-2B-shaped decode chain give bit-identical results with PDL
on and off, eagerly and as CUDA graph replays, and the engine's greedy tokens are the same with
`set_options(pdl=True)` and `pdl=False`.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the @triton.jit decorations

from compress.kernels import cache, common, decode, gemv, kernel_options, norm, set_options, using_options  # noqa: E402

# The Triton kernels of one batch-1 decode step on the fast path (docs/kernels.md lists the torch ops
# between them); linear_split_k_kernel runs instead of linear_small_m_kernel where a table entry has
# split_k > 1 (none by default).
STEP_KERNELS = {
    "rms_norm_kernel": norm, "rms_norm_pair_kernel": norm, "linear_small_m_kernel": gemv,
    "gelu_tanh_and_mul_gemv_kernel": gemv, "linear_split_k_kernel": gemv, "logits_small_m_kernel": gemv,
    "argmax_finish_kernel": gemv,
    "rotary_and_cache_kernel": cache,
    "paged_decode_split_kernel": decode, "paged_decode_reduce_kernel": decode,
}
# What may be loaded before the wait: model weights and constants (the RoPE table), which no kernel writes
# while a step runs; the step's metadata, copied in before its first kernel (positions, slots, seq_lens,
# block tables); and a residual the caller declares settled (rms_norm_pair's RESIDUAL_SETTLED: written
# before the kernel just before, which is complete when a PDL kernel starts, kernels/common.py).
WEIGHT_POINTERS = {"weight_ptr", "w1_ptr", "w2_ptr", "cos_sin_ptr"}
METADATA_POINTERS = {"positions_ptr", "slot_mapping_ptr", "seq_lens_ptr", "block_tables_ptr"}
SETTLED_POINTERS = {"residual_ptr"}
WEIGHT_HELPERS = {"_weight_tile"}      # no kernel calls it before the wait today (measured slower)
WAIT = "pdl_wait(USE_PDL)"


def kernel_source(kernel) -> str:
    return inspect.getsource(kernel.fn)       # JITFunction and the interpreter's wrapper both keep .fn


def wait_problems(source: str) -> list[str]:
    """What is wrong with a USE_PDL kernel's source: no top-level wait, or a store, an atomic, a load
    of a non-weight pointer or a call of a helper other than a weight loader before the wait."""
    body = source[source.index("):\n") + 3:]
    lines = body.splitlines()
    waits = [i for i, line in enumerate(lines) if WAIT in line]
    if not waits:
        return [f"no {WAIT}"]
    first = waits[0]
    problems = [] if lines[first].startswith("    " + WAIT) else ["the first wait is not at the kernel's top level"]
    before = "\n".join(line.split("#")[0] for line in lines[:first])
    problems += [f"{op} before the wait" for op in re.findall(r"tl\.(store|atomic_\w+)\(", before)]
    problems += [f"load of {ptr} before the wait" for ptr in re.findall(r"tl\.load\((\w+)", before)
                 if ptr not in WEIGHT_POINTERS | METADATA_POINTERS | SETTLED_POINTERS]
    problems += [f"{name}() before the wait" for name in re.findall(r"\b(_\w+)\(", before)
                 if name not in WEIGHT_HELPERS]
    return problems


def test_pdl_is_off_on_cpu_and_under_the_interpreter(monkeypatch):
    for value in (None, False, True):
        set_options(pdl=value)
        assert not common.pdl_enabled(torch.device("cpu"), 1)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not common.pdl_enabled(torch.device("cuda", 0), 1)
        assert common.pdl_launch(torch.device("cuda", 0), 1) == {"USE_PDL": False}   # no launch_pdl key


def test_pdl_switch_follows_the_device_and_the_pdl_option(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernel_options().pdl is None
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(common, "device_supports_pdl", lambda index: True)
    assert common.pdl_enabled(cuda, 1) and common.pdl_launch(cuda, 1) == {"USE_PDL": True, "launch_pdl": True}
    assert common.pdl_enabled(cuda, common.PDL_MAX_ROWS)
    assert not common.pdl_enabled(cuda, common.PDL_MAX_ROWS + 1)      # large grids launch as before
    set_options(pdl=False)
    assert not common.pdl_enabled(cuda, 1)
    set_options(pdl=True)
    assert common.pdl_enabled(cuda, 1)
    monkeypatch.setattr(common, "device_supports_pdl", lambda index: False)     # an A100, or an old triton
    with pytest.raises(ValueError, match=r"pdl=True needs compute capability >= 9\.0"):
        common.pdl_enabled(cuda, 1)
    set_options(pdl=None)
    assert not common.pdl_enabled(cuda, 1)
    with pytest.raises(ValueError, match=r"pdl must be None \(auto\), False \(off\) or True"):
        set_options(pdl="on")
    assert kernel_options().pdl is None and not common.pdl_enabled(cuda, 1)


def test_fused_logits_switch():
    from compress.kernels import dispatch
    assert dispatch.fused_logits()
    set_options(fused_logits=False)
    assert not dispatch.fused_logits()
    with pytest.raises(ValueError, match="fused_logits must be True or False"):
        set_options(fused_logits="on")
    assert not dispatch.fused_logits()


def test_this_triton_has_launch_pdl_and_the_gdc_calls():
    pytest.importorskip("triton.backends.nvidia")
    assert common.triton_supports_pdl()


def test_every_step_kernel_takes_use_pdl_and_every_use_pdl_kernel_waits_first():
    for name, module in STEP_KERNELS.items():
        assert "USE_PDL" in inspect.signature(getattr(module, name).fn).parameters, name
    found = []
    for module in set(STEP_KERNELS.values()):
        for name, kernel in vars(module).items():
            if name.endswith("_kernel") and "USE_PDL" in inspect.signature(kernel.fn).parameters:
                found.append(name)
                assert wait_problems(kernel_source(kernel)) == [], name
    assert set(found) == set(STEP_KERNELS)
    helper = kernel_source(common.pdl_wait)
    assert helper.index("if USE_PDL:") < helper.index("gdc_wait()") < helper.index("gdc_launch_dependents()")


def test_the_source_check_catches_a_store_or_an_activation_load_before_the_wait():
    good = "def k(x_ptr, w_ptr, USE_PDL: tl.constexpr):\n    w = _weight_tile(w_ptr)\n    pdl_wait(USE_PDL)\n"
    assert wait_problems(good) == []
    store_first = good.replace("    pdl_wait", "    tl.store(x_ptr, w)\n    pdl_wait")
    load_first = good.replace("    pdl_wait", "    x = tl.load(x_ptr)\n    pdl_wait")
    helper_first = good.replace("    pdl_wait", "    y = _rows_dot_tile(x_ptr, w)\n    pdl_wait")
    nested = good.replace("    pdl_wait(USE_PDL)", "    if w > 0:\n        pdl_wait(USE_PDL)")
    assert wait_problems(store_first) == ["store before the wait"]
    assert wait_problems(load_first) == ["load of x_ptr before the wait"]
    assert wait_problems(helper_first) == ["_rows_dot_tile() before the wait"]
    assert wait_problems(nested) == ["the first wait is not at the kernel's top level"]
    assert wait_problems(good.replace("    pdl_wait(USE_PDL)\n", "")) == ["no pdl_wait(USE_PDL)"]


REPO = Path(__file__).resolve().parents[1]


PTX_SCRIPT = """
import re
import sys
sys.path.insert(0, "evals/lab")
from sass_summary import compile_sm90
from compress.kernels import cache, decode, gemv, norm

def ptx(fn, consts, pdl=True, **options):
    return compile_sm90(fn, consts, options, pdl=pdl).asm["ptx"].splitlines()

def first(lines, pattern):
    return next((i for i, line in enumerate(lines) if re.search(pattern, line)), len(lines))

def cases():
    # (name, kernel, constexprs, options, loads before the wait?) at Gemma-2-2B shapes
    for (rows, n, k), c in gemv.LINEAR_CONFIGS.items():
        yield (f"linear {n}x{k}", gemv.linear_small_m_kernel, dict(BLOCK_M=rows, BLOCK_N=c.block_n,
               BLOCK_K=c.block_k), dict(num_warps=c.num_warps, num_stages=c.num_stages), False)
    for (rows, n, k), c in gemv.GEGLU_CONFIGS.items():
        yield (f"geglu {n}x{k}", gemv.gelu_tanh_and_mul_gemv_kernel, dict(BLOCK_M=rows, BLOCK_N=c.block_n,
               BLOCK_K=c.block_k), dict(num_warps=c.num_warps, num_stages=c.num_stages), False)
    for argmax in (False, True):
        yield (f"logits argmax={argmax}", gemv.logits_small_m_kernel,
               dict(BLOCK_M=1, BLOCK_N=8, BLOCK_K=256, USE_SOFTCAP=True, ARGMAX=argmax), dict(num_stages=3), False)
    yield "argmax finish", gemv.argmax_finish_kernel, {}, {}, False
    yield ("split-k", gemv.linear_split_k_kernel, dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=512, SPLIT_K=2),
           dict(num_stages=3), False)
    for residual in (False, True):
        yield (f"rms_norm residual={residual}", norm.rms_norm_kernel,
               dict(HIDDEN=2304, BLOCK_H=4096, HAS_RESIDUAL=residual), {}, True)
    for settled in (False, True):
        yield (f"rms_norm_pair settled={settled}", norm.rms_norm_pair_kernel,
               dict(HIDDEN=2304, BLOCK_H=4096, RESIDUAL_SETTLED=settled), {}, True)
    for qk_norm in (False, True):
        yield (f"rotary_and_cache qk_norm={qk_norm}", cache.rotary_and_cache_kernel,
               dict(NUM_Q_HEADS=8, BLOCK_SIZE=16, HALF=128, BLOCK_HALF=128, USE_QK_NORM=qk_norm),
               dict(num_warps=2), True)
    for splits in (1, 64):
        yield (f"decode splits={splits}", decode.paged_decode_split_kernel,
               dict(QUERIES_PER_KV=2, BLOCK_G=16, HEAD_DIM=256, BLOCK_D=256, BLOCK_SIZE=16, BLOCK_N=32,
                    NUM_SPLITS=splits, USE_SOFTCAP=True, USE_WINDOW=False, UPCAST=False),
               dict(num_stages=3), True)
    yield ("decode reduce", decode.paged_decode_reduce_kernel,
           dict(HEAD_DIM=256, BLOCK_D=64, BLOCK_N=32, NUM_SPLITS=64, BLOCK_S=64, USE_WINDOW=True), {}, True)

for name, fn, consts, options, prefetch in cases():
    lines = ptx(fn, consts, **options)
    wait, release = first(lines, r"griddepcontrol\\.wait"), first(lines, r"griddepcontrol\\.launch_dependents")
    store = first(lines, r"\\b(st\\.global|atom\\.|red\\.)")
    loads = sum("ld.global" in line for line in lines[:wait])
    assert wait < release < store < len(lines), (name, wait, release, store)
    assert (loads > 0) == prefetch, (name, loads)
    print(name, "wait at", wait, "first store at", store, "loads before the wait", loads)
plain = ptx(gemv.linear_small_m_kernel, dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=512), pdl=False)
assert not any("griddepcontrol" in line for line in plain)
print("ptx ok")
"""


def test_pdl_kernels_compile_for_sm90_with_the_wait_before_every_store(compile_env):
    """The H100 code itself (no device needed): griddepcontrol.wait comes before every global store and
    atomic and before launch_dependents; norms load their weights (and a settled residual) before it,
    rotary and decode the step's metadata, the GEMVs nothing."""
    pytest.importorskip("triton.backends.nvidia")
    proc = subprocess.run([sys.executable, "-c", PTX_SCRIPT], capture_output=True, text=True, env=compile_env,
                          timeout=300, cwd=REPO)     # the script imports evals/lab/sass_summary.py
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "ptx ok" in proc.stdout


def test_early_loads_sit_before_the_wait_in_the_h100_machine_code(compile_env):
    """evals/lab/sass_summary.py (nvdisasm of the sm90 cubin): the settled residual, the step's metadata and the
    decode split's first block numbers are loaded before ACQBULK (the wait); an unsettled residual after."""
    pytest.importorskip("triton.backends.nvidia")
    proc = subprocess.run([sys.executable, str(REPO / "evals" / "lab" / "sass_summary.py"), "--kernel", "norm_pair",
                           "norm_pair_settled", "rotary_and_cache", "decode_split"],
                          capture_output=True, text=True, env=compile_env, timeout=300)
    if proc.returncode != 0 and "without the CUDA binaries" in proc.stdout + proc.stderr:
        pytest.skip("this triton ships without nvdisasm or cuobjdump")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = {}
    for line in proc.stdout.splitlines():
        name, _, events = line.partition(": ")
        head = events.split("ACQBULK")[0]
        before[name] = sum(int(n) for n in re.findall(r"LDG\S*x(\d+)", head))
    assert before["norm_pair_settled"] > before["norm_pair"] > 0     # the residual joins the weights
    assert before["rotary_and_cache"] > 0 and before["decode_split"] > 0, before
    for line in proc.stdout.splitlines():        # registers and residency from cuobjdump
        regs, fit = map(int, re.search(r"\| (\d+) registers, (\d+) programs/SM$", line).groups())
        assert 16 <= regs <= 255 and 1 <= fit <= 32, line


def test_programs_per_sm_follow_the_h100_limits():
    sys.path.insert(0, str(REPO / "evals" / "lab"))
    from sass_summary import programs_per_sm
    assert programs_per_sm(56, 4, 1024) == 9          # 56 x 32 = 1792 registers a warp: 36 warps
    assert programs_per_sm(42, 4, 1024) == 10         # 1344 rounds up to 1536: 42 warps
    assert programs_per_sm(32, 2, 0) == 32            # the program limit
    assert programs_per_sm(32, 8, 0) == 8             # the warp limit
    assert programs_per_sm(32, 4, 100 * 1024) == 2    # shared memory


# ---- GPU: the lead runs these on the H100 ----------------------------------------------------------

def _needs_pdl():
    if not torch.cuda.is_available() or not common.device_supports_pdl(torch.cuda.current_device()):
        pytest.skip("needs an sm90+ GPU and a triton with launch_pdl")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, NaN where NaN (the paged caches keep NaN in slots no sequence owns)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _chain_outputs(run, pdl: bool, graph: bool):
    set_options(pdl=pdl)                             # read at each launch, and at capture for the graph
    if graph:
        run()                                        # compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outputs = run()
        for _ in range(3):
            g.replay()
    else:
        for _ in range(3):
            outputs = run()
    torch.cuda.synchronize()
    h, k_caches, v_caches = outputs
    return [h.clone()] + [c.clone() for c in k_caches + v_caches]


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("variant", ["default", "split_k"])
def test_gpu_decode_chain_is_bit_identical_with_pdl_on_and_off(monkeypatch, graph, variant):
    """Three Gemma-2-2B layers of batch-1 decode kernels back to back (kernels.testing.decode_layer_chain),
    eagerly and as graph replays; the split_k variant puts the ticket-counter kernel in the chain (split-K
    qkv and o_proj GEMVs)."""
    _needs_pdl()
    from compress.kernels import dispatch
    from compress.kernels.testing import decode_layer_chain
    dispatch.set_backend("triton")
    if variant != "default":
        split = {key: gemv.GemvConfig(config.block_n, 256, config.num_warps, 3, split_k=2)
                 for key, config in gemv.LINEAR_CONFIGS.items() if key[1] in (4096, 2304) and key[2] != 9216}
        monkeypatch.setattr(gemv, "LINEAR_CONFIGS", {**gemv.LINEAR_CONFIGS, **split})
    run = decode_layer_chain(3)
    torch.cuda.synchronize()                 # weights are read before the wait: they must be written by now
    off = _chain_outputs(run, False, graph)
    on = _chain_outputs(run, True, graph)
    assert all(_same(a, b) for a, b in zip(on, off))
    assert torch.isfinite(on[0]).all()
    assert not common.ticket_counters(torch.device("cuda")).any()


@pytest.mark.gpu
@pytest.mark.parametrize("num_rows", [1, 3])
def test_gpu_gemv_and_norm_kernels_identical_with_pdl_on_and_off(num_rows):
    """Each kernel alone, back to back 20 times on the same inputs, at shapes with edge masks."""
    _needs_pdl()
    gen = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, 2304, generator=gen).cuda().bfloat16()
    weights = [(torch.randn(n, 2304, generator=gen) / 48).cuda().bfloat16() for n in (4096, 4610, 18432)]
    w1, w2 = (torch.randn(2304, generator=gen).cuda().bfloat16() * 0.1 for _ in range(2))
    torch.cuda.synchronize()

    def outputs(pdl: bool):
        with using_options(pdl=pdl):
            for _ in range(20):
                ys = [gemv.linear_small_m(x, w) for w in weights[:2]] + [gemv.gelu_tanh_and_mul_gemv(x, weights[2])]
                ys += list(norm.rms_norm_pair(ys[0][:, :2304], w1, w2, 1e-6, x)) + [norm.rms_norm(x, w1, 1e-6)]
        torch.cuda.synchronize()
        return ys

    assert all(torch.equal(a, b) for a, b in zip(outputs(True), outputs(False)))


GPU_ENGINE_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from serve_fixtures import gemma2_config, gemma3_config, random_model, random_prompts, save_model
from serve import LLM, SamplingParams
from compress.kernels import set_options
from compress.kernels.common import pdl_enabled
params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
prompts = random_prompts([3, 30, 12, 21, 9, 17, 40, 5])

for name, config in (("gemma2", gemma2_config()), ("gemma3", gemma3_config())):
    path = save_model(random_model(config, seed=3), {path!r} + name)
    tokens = {{}}
    # PDL off with the logits in four launches, PDL on with them fused, PDL on with them in four
    for pdl, logits in ((False, False), (True, True), (True, False)):
        set_options(pdl=pdl, fused_logits=logits)          # captured in LLM()
        assert pdl_enabled(torch.device("cuda"), 1) == pdl
        batched = LLM(path, block_size=4, max_num_batched_tokens=32, max_num_seqs=8)
        alone = LLM(path, block_size=4, max_num_batched_tokens=32, max_num_seqs=1)   # batch-1 GEMV graphs
        assert alone.engine.runner.decode_graphs.graphs
        tokens[pdl, logits] = [[o.outputs[0].token_ids for o in llm.generate(prompts, params)] for llm in (batched, alone)]
        del batched, alone
    assert tokens[True, True] == tokens[False, False] == tokens[True, False], (name, tokens)
    print(name, "same tokens")
"""


@pytest.mark.gpu
def test_gpu_engine_greedy_tokens_same_with_pdl_on_and_off(tmp_path):
    """bf16 engine (CUDA graphs, overlapped loop, batch-1 GEMVs and batched steps): PDL on and off
    (`set_options(pdl=True / False)`) give the same greedy tokens (the kernels compute the same values;
    only the launch differs)."""
    _needs_pdl()
    script = GPU_ENGINE_SCRIPT.format(tests=str(Path(__file__).parent), path=str(tmp_path / "m"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("same tokens") == 2

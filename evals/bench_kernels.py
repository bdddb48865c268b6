"""Paged decode and prefill attention (kernels/) against torch SDPA and FlexAttention on the same shapes.

SDPA and FlexAttention read contiguous, unpaged KV ([B, Hkv, S, D]) built from the same values; SDPA
has no soft-cap, so its rows are the no-cap floor the issue compares with. Times are CUDA events
around each call after warm-up, median of --iters; the ceiling is a measured device-to-device copy
(bytes read + written). Decode is memory-bound: GB/s counts K and V of every visible token once, plus
q and out. Prefill is compute-bound: TFLOP/s counts the causal half of QK^T and PV (4 * Hq * D per pair).

    PYTHONPATH=. python3 evals/bench_kernels.py [--sweep] [--out evals/results/kernels_gpu.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.kernels import DecodeConfig, decode, prefill, using_options
from compress.kernels.reference import gather_kv
from compress.kernels.testing import make_paged_problem, relative_error

# decode: (BLOCK_N, num_warps, num_stages, programs per SM); prefill: (BLOCK_M, BLOCK_N, warps, stages)
DECODE_SWEEP = [(32, 4, 3, 2.0), (32, 4, 3, 1.0), (32, 4, 3, 4.0), (64, 4, 2, 2.0), (32, 4, 2, 2.0),
                (32, 8, 3, 2.0)]
PREFILL_SWEEP = {256: [(128, 64, 8, 2), (128, 64, 4, 2), (64, 64, 4, 2), (128, 32, 4, 3)],
                 128: [(128, 128, 8, 2), (128, 128, 4, 2), (64, 128, 4, 3), (128, 64, 8, 2)]}


@dataclass
class Case:
    name: str
    kind: str                    # "decode" or "prefill"
    batch: int
    context: int                 # decode: tokens in cache; prefill: new tokens (no prefix)
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    softcap: float | None = 50.0
    window: int | None = None


CASES = [
    Case("decode b32 ctx4096 8q/4kv d256 cap50", "decode", 32, 4096),
    Case("decode b32 ctx4096 8q/4kv d256 nocap", "decode", 32, 4096, softcap=None),
    Case("decode b32 ctx4096 window1024 cap50", "decode", 32, 4096, window=1024),
    Case("decode b8 ctx8192 4q/1kv d256 nocap", "decode", 8, 8192, 4, 1, softcap=None),
    Case("decode b64 ctx1024 8q/8kv d128 nocap", "decode", 64, 1024, 8, 8, 128, softcap=None),
    Case("prefill b4 len2048 8q/4kv d256 cap50", "prefill", 4, 2048),
    Case("prefill b4 len2048 8q/4kv d256 nocap", "prefill", 4, 2048, softcap=None),
    Case("prefill b4 len2048 16q/8kv d128 nocap", "prefill", 4, 2048, 16, 8, 128, softcap=None),
]


def capture(fn, reps: int):
    """A CUDA graph of `reps` calls of fn (device time without Python launch overhead), else None."""
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        return graph
    except Exception as error:  # e.g. a compiled callable that re-guards during capture
        print(f"graph capture failed ({type(error).__name__}: {error}); timing eagerly", file=sys.stderr)
        torch.cuda.synchronize()
        return None


def time_ms(fn, iters: int, reps: int = 10, graph: bool = True) -> float:
    """Median ms per call over `iters` event-timed replays of a graph holding `reps` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = capture(fn, reps) if graph else None
    run, per = (graph.replay, reps) if graph is not None else (fn, 1)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per)
    return statistics.median(times)


def copy_bandwidth_gbs(iters: int) -> float:
    src = torch.randn(512 * 2 ** 20, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    # eager: a captured copy becomes a graph memcpy node, measured 17% slower on the H100
    ms = time_ms(lambda: dst.copy_(src), iters, graph=False)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def build(case: Case):
    if case.kind == "decode":
        contexts, q_lens = [case.context - 1] * case.batch, [1] * case.batch
    else:
        contexts, q_lens = [0] * case.batch, [case.context] * case.batch
    problem = make_paged_problem(contexts, q_lens, num_heads=case.num_heads,
                                 num_kv_heads=case.num_kv_heads, head_dim=case.head_dim,
                                 sliding_window=case.window, device="cuda", seed=1)
    length = case.context
    first = 0 if case.window is None or case.kind != "decode" else max(0, length - case.window)
    dense_k = torch.stack([gather_kv(problem.k_cache, problem.block_tables[b], length, first)
                           for b in range(case.batch)]).transpose(1, 2).contiguous()  # [B, Hkv, S, D]
    dense_v = torch.stack([gather_kv(problem.v_cache, problem.block_tables[b], length, first)
                           for b in range(case.batch)]).transpose(1, 2).contiguous()
    return problem, dense_k, dense_v


def ours(case: Case, problem, scale):
    if case.kind == "decode":
        return lambda: decode.paged_decode_attention(
            problem.q, problem.k_cache, problem.v_cache, problem.block_tables, problem.seq_lens,
            scale=scale, sliding_window=case.window, softcap=case.softcap)
    return lambda: prefill.paged_prefill_attention(
        problem.q, problem.k_cache, problem.v_cache, problem.block_tables, problem.cu_seqlens_q,
        problem.seq_lens, max_seqlen_q=problem.max_seqlen_q, scale=scale,
        sliding_window=case.window, softcap=case.softcap)


def dense_q(case: Case, problem):
    return problem.q.view(case.batch, -1, case.num_heads, case.head_dim).transpose(1, 2).contiguous()


def sdpa(case: Case, q, k, v, scale):
    causal = case.kind == "prefill"
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                  enable_gqa=True)


def flex(case: Case, q, k, v, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    cap = case.softcap

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap) if cap is not None else score

    block_mask = None
    if case.kind == "prefill":
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None,
                                       q.shape[2], k.shape[2], device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                            enable_gqa=True)


def work(case: Case, q, k):
    """(bytes moved, flops) of one call on contiguous KV (the visible context only)."""
    element = q.element_size()
    num_bytes = 2 * k.numel() * element + 2 * q.numel() * element
    pairs = q.shape[2] * k.shape[2] if case.kind == "decode" else q.shape[2] * (q.shape[2] + 1) / 2
    return num_bytes, 4 * case.batch * case.num_heads * case.head_dim * pairs


def bench_case(case: Case, iters: int, copy_gbs: float) -> list[dict]:
    problem, k, v = build(case)
    scale = case.head_dim ** -0.5
    q = dense_q(case, problem)
    num_bytes, flops = work(case, q, k)
    torch.cuda.synchronize()
    reference = flex(case, q, k, v, scale)().transpose(1, 2).reshape(problem.q.shape)
    err = relative_error(ours(case, problem, scale)(), reference)
    rows = []
    impls = [("triton paged", ours(case, problem, scale)), ("flex (unpaged)", flex(case, q, k, v, scale))]
    if case.softcap is None:
        impls.append(("sdpa (unpaged)", sdpa(case, q, k, v, scale)))
    for impl, fn in impls:
        ms = time_ms(fn, iters)
        gbs = num_bytes / ms / 1e6
        rows.append({"case": case.name, "impl": impl, "us": ms * 1e3, "gbs": gbs,
                     "pct": 100 * gbs / copy_gbs, "tflops": flops / ms / 1e9,
                     "err": err if impl == "triton paged" else None})
    return rows


def sweep_prefill(case: Case, iters: int) -> list[dict]:
    problem, k, _ = build(case)
    _, flops = work(case, dense_q(case, problem), k)
    key = 128 if case.head_dim <= 128 else 256
    saved = prefill.PREFILL_CONFIG[key]
    rows = []
    for config in PREFILL_SWEEP[key]:
        prefill.PREFILL_CONFIG[key] = config
        ms = time_ms(ours(case, problem, case.head_dim ** -0.5), iters)
        rows.append({"case": case.name, "impl": "BM{} BN{} w{} s{}".format(*config), "us": ms * 1e3,
                     "gbs": 0.0, "pct": 0.0, "tflops": flops / ms / 1e9, "err": None})
    prefill.PREFILL_CONFIG[key] = saved
    return rows


def sweep_decode(case: Case, iters: int, copy_gbs: float) -> list[dict]:
    problem, _, _ = build(case)
    rows = []
    for block_n, warps, stages, per_sm in DECODE_SWEEP:
        with using_options(decode_config=DecodeConfig(block_n, warps, stages, per_sm)):
            ms = time_ms(ours(case, problem, case.head_dim ** -0.5), iters)
        num_bytes = 2 * case.batch * case.context * case.num_kv_heads * case.head_dim * 2
        rows.append({"case": case.name, "impl": f"BN{block_n} w{warps} s{stages} p{per_sm}",
                     "us": ms * 1e3, "gbs": num_bytes / ms / 1e6,
                     "pct": 100 * num_bytes / ms / 1e6 / copy_gbs, "tflops": 0.0, "err": None})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | implementation | time (us) | GB/s | % of copy BW | TFLOP/s | rel. err vs flex |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        err = f"{r['err']:.1e}" if r["err"] is not None else ""
        lines.append(f"| {r['case']} | {r['impl']} | {r['us']:.1f} | {r['gbs']:.0f} | {r['pct']:.1f} "
                     f"| {r['tflops']:.1f} | {err} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="also time decode launch configs")
    parser.add_argument("--out", type=Path, default=Path("evals/results/kernels_gpu.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA device", file=sys.stderr)
        return 2
    copy_gbs = copy_bandwidth_gbs(args.iters)
    rows = []
    for case in CASES:
        rows += bench_case(case, args.iters, copy_gbs)
        print(table(rows[-3:]), flush=True)
    if args.sweep:
        rows += sweep_decode(CASES[0], args.iters, copy_gbs)
        rows += sweep_prefill(CASES[5], args.iters) + sweep_prefill(CASES[7], args.iters)
    device = torch.cuda.get_device_name()
    text = (f"# Paged attention kernels on {device}\n\n"
            f"torch {torch.__version__}, triton {__import__('triton').__version__}; "
            f"device-to-device copy: {copy_gbs:.0f} GB/s (the ceiling).\n\n"
            f"Command: `PYTHONPATH=. python3 evals/bench_kernels.py{' --sweep' if args.sweep else ''}`\n\n"
            + table(rows) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

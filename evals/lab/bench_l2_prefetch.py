"""Does an L2 prefetch of a weight make the next GEMV on it faster? A diagnostic for docs/kernels.md.

For the batch-1 decode GEMVs that fit in L2 (Gemma-2-2B qkv 4096x2304, o_proj 2304x2048), each timed
alone (CUDA events around the GEMV only, median of `--iters`) after L2 is flushed (a 256 MiB write) and
then one of:
- cold: nothing (the weight comes from DRAM, as in a decode step today);
- prefetch: a separate kernel issues `prefetch.global.L2` for every 128-byte line of the weight;
- prefetch evict_last: the same with `prefetch.global.L2::evict_last`;
- touched: a separate kernel loads the whole weight (the upper bound: the weight is in L2).
The GEMV's output is checked against torch each time.

    python evals/lab/bench_l2_prefetch.py [--iters 30]        # GPU only
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from compress.kernels import gemv  # noqa: E402
from compress.kernels.testing import relative_error  # noqa: E402

SHAPES = {"qkv": (4096, 2304), "o_proj": (2304, 2048)}
HINTS = {"prefetch": "prefetch.global.L2 [$1]; mov.u32 $0, 0;",
         "prefetch evict_last": "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;"}


@triton.jit
def prefetch_kernel(base, num_lines, HINT: tl.constexpr, BLOCK: tl.constexpr):
    base = base.to(tl.pointer_type(tl.int8))
    for start in range(tl.program_id(0) * BLOCK, num_lines, tl.num_programs(0) * BLOCK):
        line = tl.minimum(start + tl.arange(0, BLOCK), num_lines - 1).to(tl.int64)
        tl.inline_asm_elementwise(HINT, "=r,l", [base + line * 128], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def touch_kernel(base, out, numel, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(tl.program_id(0) * BLOCK, numel, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(base + offs, mask=offs < numel, other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0)
    tl.store(out + tl.program_id(0), total, mask=total == -1.25)     # never true: keeps the loads


def run_mode(mode: str, weight: torch.Tensor, programs: int, scratch: torch.Tensor) -> None:
    if mode in HINTS:
        lines = weight.numel() * weight.element_size() // 128
        prefetch_kernel[(programs,)](weight, lines, HINT=HINTS[mode], BLOCK=256)
    elif mode == "touched":
        touch_kernel[(programs,)](weight, scratch, weight.numel(), BLOCK=2048)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_l2_prefetch needs a CUDA device", file=sys.stderr)
        return 2
    programs = torch.cuda.get_device_properties(0).multi_processor_count * 4
    flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")
    scratch = torch.zeros(programs, device="cuda")
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}; "
          "GEMV alone after an L2 flush and the mode's kernel")
    print("| shape | mode | GEMV us (median) | vs cold | rel. err |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, (n, k) in SHAPES.items():
        weight = (torch.randn(n, k, device="cuda") / k ** 0.5).bfloat16()
        x = torch.randn(1, k, device="cuda").bfloat16()
        want = (x.float() @ weight.float().T)
        cold = None
        for mode in ("cold", *HINTS, "touched"):
            times, err = [], 0.0
            for i in range(args.iters + 3):
                torch.cuda._sleep(2_000_000)            # the host queues what follows before the GPU gets there
                flush.zero_()
                run_mode(mode, weight, programs, scratch)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                y = gemv.linear_small_m(x, weight)
                end.record()
                torch.cuda.synchronize()
                if i >= 3:                                  # warm-up: compiles and first launches
                    times.append(start.elapsed_time(end) * 1e3)
                err = max(err, relative_error(y.float(), want))
            us = statistics.median(times)
            cold = us if mode == "cold" else cold
            print(f"| {name} | {mode} | {us:.2f} | {us / cold:.2f}x | {err:.1e} |", flush=True)
            if err > 2e-2:
                raise RuntimeError(f"{name} {mode}: GEMV differs from torch by {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

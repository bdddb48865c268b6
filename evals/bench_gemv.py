"""Small-batch GEMV kernels (kernels/gemv.py) against cuBLAS on the Gemma-2-2B decode shapes, on the GPU.

Shapes (weight [N, K], bf16): qkv 4096x2304, o_proj 2304x2048, gate_up 18432x2304 (ours: the fused
GeGLU kernel; torch: F.linear then tanh-GELU and the product, two more kernels), down 2304x9216,
lm_head 256000x2304, each at M = 1, 2, 4 rows. Every result is first checked against torch. Times are
CUDA events around CUDA-graph replays after warm-up, medians; each graph cycles through enough copies
of the weight that the working set exceeds twice the L2 (so no call reads its weights from cache, as
in a real decode step where every layer has its own). GB/s counts weights + x + out once.
The step estimate sums 26 layers of the four per-layer products and one lm_head.

    python evals/bench_gemv.py [--sweep] [--rows 1 2 4] [--shapes qkv down] [--json out.json] [--out out.md]
    python evals/bench_gemv.py --rows 1 --shapes qkv o_proj down --l2-hot   # one weight copy, L2-resident

`--l2-hot` times each product on a single weight copy replayed back to back, so a weight that fits in L2
is read from it: the bound on what a prefetch of the weights into L2 could save (docs/kernels.md).

`--sweep` times a grid of launch configs per (shape, M) first, uses the best ones for the table, and
prints them as entries for LINEAR_CONFIGS / GEGLU_CONFIGS in kernels/gemv.py. On the linear shapes with
N <= 8192 (qkv, o_proj, down) the grid includes split-K configs (`--split-k 1 2 3 4`, the default;
`--split-k 1` for the plain grid only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import copy_bandwidth_gbs, time_ms  # noqa: E402
from compress.kernels import gemv  # noqa: E402
from compress.kernels.common import next_pow2  # noqa: E402
from compress.kernels.testing import relative_error  # noqa: E402

SHAPES = {"qkv": (4096, 2304, "linear"), "o_proj": (2304, 2048, "linear"), "gate_up": (18432, 2304, "geglu"),
          "down": (2304, 9216, "linear"), "lm_head": (256000, 2304, "linear")}
NUM_LAYERS = 26
SPLIT_K_MAX_N = 8192
DEFAULT_L2 = 50 * 2 ** 20
DEVICE, DTYPE = "cuda", torch.bfloat16


def sweep_grid(rows: int, n: int, k: int, kind: str, split_ks=(1,)) -> list[gemv.GemvConfig]:
    """Configs holding 16..64 fp32 accumulators per thread: fewer leaves too few loads in flight to
    cover memory latency, more spills. ~30 per row bucket, each compiled once for all shapes.
    Split-K candidates (linear, N <= SPLIT_K_MAX_N only: the big matrices already fill the GPU) use 4
    warps, at least one K tile per split, and 3 stages only where a split walks more than one tile."""
    block_m, grid = gemv.rows_bucket(rows), []
    for warps in (4, 8):
        for block_n in (1, 2, 4, 8):
            for block_k in (b for b in (256, 512, 1024, 2048) if b <= max(256, next_pow2(k))):
                if 16 <= block_m * block_n * block_k / (32 * warps) <= 64:
                    grid += [gemv.GemvConfig(block_n, block_k, warps, stages) for stages in (1, 3)]
    if kind != "linear" or n > SPLIT_K_MAX_N:
        return grid
    base = [c for c in grid if c.num_warps == 4 and c.num_stages == 1]
    for split_k in (s for s in split_ks if s > 1):
        for config in base:
            tiles = -(-k // config.block_k)
            if tiles >= split_k:
                stages = 3 if tiles > split_k else 1
                grid.append(gemv.GemvConfig(config.block_n, config.block_k, 4, stages, split_k))
    return grid


def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or DEFAULT_L2


class Problem:
    """Weight copies of one shape (working set > 2x L2) and an input of `rows` rows."""

    def __init__(self, name: str, rows: int, hot: bool = False):
        self.name, self.rows = name, rows
        self.n, self.k, self.kind = SHAPES[name]
        weight_bytes = self.n * self.k * 2
        self.copies = 1 if hot else 2 * l2_bytes() // weight_bytes + 1    # cold: strictly more than 2x L2
        generator = torch.Generator(device=DEVICE).manual_seed(0)
        self.weights = [torch.randn(self.n, self.k, device=DEVICE, dtype=DTYPE, generator=generator)
                        / self.k ** 0.5 for _ in range(self.copies)]
        self.x = torch.randn(rows, self.k, device=DEVICE, dtype=DTYPE, generator=generator)
        self.width = self.n // 2 if self.kind == "geglu" else self.n
        self.out = torch.empty(rows, self.width, device=DEVICE, dtype=DTYPE)

    @property
    def bytes_per_call(self) -> int:
        return self.x.element_size() * (self.n * self.k + self.rows * self.k + self.rows * self.width)

    def torch_call(self, weight):
        y = F.linear(self.x, weight)
        if self.kind == "geglu":
            gate, up = y.chunk(2, dim=-1)
            y = F.gelu(gate, approximate="tanh") * up
        return y

    def ours_call(self, weight, config=None):
        if config is None:
            op = gemv.linear_small_m if self.kind == "linear" else gemv.gelu_tanh_and_mul_gemv
            return op(self.x, weight)
        kernel = gemv.linear_small_m_kernel if self.kind == "linear" else gemv.gelu_tanh_and_mul_gemv_kernel
        gemv.launch(kernel, self.x, weight, self.out, self.width, config)
        return self.out

    def cycle(self, call):
        """One graph-capturable pass over all weight copies."""
        return lambda: [call(w) for w in self.weights]

    def time_us(self, call, iters: int) -> float:
        reps = max(1, 16 // self.copies)
        return time_ms(self.cycle(call), iters, reps=reps) * 1e3 / self.copies

    def check(self, config=None) -> float:
        """Relative error of ours vs torch on the first copy; raises if it is not a rounding difference."""
        err = relative_error(self.ours_call(self.weights[0], config), self.torch_call(self.weights[0]))
        if err > 2e-2:
            raise RuntimeError(f"{self.name} M={self.rows} {config}: relative error {err:.2e} vs torch")
        return err


def table_key(problem: Problem) -> tuple[int, int, int]:
    return gemv.rows_bucket(problem.rows), problem.n, problem.k


def sweep(problem: Problem, iters: int, split_ks=(1,)) -> tuple[gemv.GemvConfig, list[dict]]:
    results = []
    for config in sweep_grid(problem.rows, problem.n, problem.k, problem.kind, split_ks):
        try:
            problem.check(config)
            us = problem.time_us(lambda w, c=config: problem.ours_call(w, c), iters)
        except Exception as error:  # a config that does not compile (shared memory, registers)
            print(f"  skip {config}: {type(error).__name__}: {str(error)[:120]}", file=sys.stderr)
            torch.cuda.synchronize()
            continue
        results.append({"shape": problem.name, "rows": problem.rows, "config": list(vars(config).values()),
                        "us": us, "gbs": problem.bytes_per_call / us / 1e3})
    best = min(results, key=lambda r: r["us"])
    print(f"sweep {problem.name} M={problem.rows}: {len(results)} configs, best {best['config']} "
          f"{best['us']:.1f} us {best['gbs']:.0f} GB/s", flush=True)
    return gemv.GemvConfig(*best["config"]), results


def bench(problem: Problem, iters: int) -> list[dict]:
    err = problem.check()
    config = gemv.pick_config(gemv.LINEAR_CONFIGS if problem.kind == "linear" else gemv.GEGLU_CONFIGS,
                              problem.rows, problem.n, problem.k)
    ours = problem.time_us(problem.ours_call, iters)
    theirs = problem.time_us(problem.torch_call, iters)
    common = {"shape": problem.name, "n": problem.n, "k": problem.k, "rows": problem.rows,
              "copies": problem.copies}
    return [{**common, "impl": "triton gemv", "config": list(vars(config).values()), "us": ours,
             "gbs": problem.bytes_per_call / ours / 1e3, "speedup": theirs / ours, "err": err},
            {**common, "impl": "torch" + (" (+GELU*mul)" if problem.kind == "geglu" else ""), "config": None,
             "us": theirs, "gbs": problem.bytes_per_call / theirs / 1e3, "speedup": 1.0, "err": None}]


def step_estimate(rows: list[dict], copy_gbs: float) -> list[str]:
    """Per M: the products of one decode step (26 layers + lm_head), ours vs torch, vs the copy floor."""
    lines = []
    for m in sorted({r["rows"] for r in rows}):
        per = {(r["shape"], r["impl"].split()[0]): r for r in rows if r["rows"] == m}
        if len({s for s, _ in per}) < len(SHAPES):
            continue
        count = {name: 1 if name == "lm_head" else NUM_LAYERS for name in SHAPES}
        total = {impl: sum(per[(s, impl)]["us"] * count[s] for s in SHAPES) for impl in ("triton", "torch")}
        weight_bytes = sum(2 * SHAPES[s][0] * SHAPES[s][1] * count[s] for s in SHAPES)
        floor = weight_bytes / copy_gbs / 1e3
        lines.append(f"- M={m}: ours {total['triton'] / 1e3:.3f} ms, torch {total['torch'] / 1e3:.3f} ms "
                     f"({total['torch'] / total['triton']:.2f}x); weights {weight_bytes / 1e9:.2f} GB, "
                     f"floor at copy bandwidth {floor / 1e3:.3f} ms (ours {total['triton'] / floor:.2f}x)")
    return lines


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | N x K | M | implementation | config (BN, BK, warps, stages, split-K) | us | GB/s | speedup |",
             "| --- | --- | ---: | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        config = ", ".join(map(str, r["config"])) if r["config"] else ""
        lines.append(f"| {r['shape']} | {r['n']}x{r['k']} | {r['rows']} | {r['impl']} | {config} "
                     f"| {r['us']:.1f} | {r['gbs']:.0f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def config_lines(best: dict) -> list[str]:
    out = []
    for table, kind in (("LINEAR_CONFIGS", "linear"), ("GEGLU_CONFIGS", "geglu")):
        out.append(f"{table} = {{")
        for (name, key), (config, us) in sorted(best.items(), key=lambda kv: (kv[0][1][1], kv[0][1][0])):
            if SHAPES[name][2] == kind:
                c = config
                split = f", split_k={c.split_k}" if c.split_k > 1 else ""
                out.append(f"    {key}: GemvConfig({c.block_n}, {c.block_k}, {c.num_warps}, {c.num_stages}{split}),"
                           f"  # {name}, {us:.1f} us")
        out.append("}")
    return out


def run_all(args) -> tuple[list[dict], list[dict], dict]:
    """(table rows, sweep results, best config per (shape, table key)) over the chosen shapes and M."""
    rows, sweeps, best = [], [], {}
    for name in args.shapes:
        for m in args.rows:
            problem = Problem(name, m, hot=args.l2_hot)
            if args.sweep:
                config, results = sweep(problem, args.iters, args.split_k)
                sweeps += results
                table = gemv.LINEAR_CONFIGS if problem.kind == "linear" else gemv.GEGLU_CONFIGS
                table[table_key(problem)] = config
                best[(name, table_key(problem))] = (config, min(r["us"] for r in results))
            rows += bench(problem, args.iters)
            print("\n".join(markdown(rows[-2:]).splitlines()[-2:]), flush=True)
            del problem
            torch.cuda.empty_cache()
    return rows, sweeps, best


def report(command: str, rows: list[dict], best: dict, copy_gbs: float, hot: bool = False) -> str:
    import triton
    working_set = "one weight copy, L2-resident where it fits" if hot else "working set > 2x L2"
    lines = [f"# Small-batch GEMV on {torch.cuda.get_device_name()}", "",
             f"torch {torch.__version__}, triton {triton.__version__}, bf16; copy bandwidth {copy_gbs:.0f} GB/s; "
             f"L2 {l2_bytes() / 2 ** 20:.0f} MiB ({working_set}).", "",
             f"Command: `python evals/bench_gemv.py {command}`", "", markdown(rows), "",
             "Decode-step products (26 layers + lm_head):", *step_estimate(rows, copy_gbs)]
    if best:
        lines += ["", "Best configs (paste into kernels/gemv.py):", "```python", *config_lines(best), "```"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="time launch configs first and use the best")
    parser.add_argument("--split-k", type=int, nargs="+", default=[1, 2, 3, 4],
                        help="split-K factors the sweep tries on linear shapes with N <= %d" % SPLIT_K_MAX_N)
    parser.add_argument("--l2-hot", action="store_true", help="one weight copy (read from L2 where it fits)")
    parser.add_argument("--json", type=Path, help="write rows (and sweep results) as JSON here")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gemv needs a CUDA device", file=sys.stderr)
        return 2
    copy_gbs = copy_bandwidth_gbs(args.iters)
    rows, sweeps, best = run_all(args)
    text = report(" ".join(argv), rows, best, copy_gbs, args.l2_hot)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs,
                                         "rows": rows, "sweep": sweeps}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

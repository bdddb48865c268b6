"""What a slimmed encoder's FFN costs on the GPU against its width (issue #2's latency target).

The FFN of a BERT-family layer, `W2 gelu(W1 x + b1) + b2` over `tokens` rows (batch 32 x 128 by
default), is timed at each width of `--widths` as graph replays (CUDA events, median of `--trials`
timings of `--replays` back-to-back calls), in these forms:

- `ffn1`, `ffn2`: the two GEMMs alone (cuBLAS through F.linear);
- `block`: FFN1, GELU, FFN2, as the slimmed model runs them now;
- `lt`: the same with torch's cuBLASLt backend (`torch.backends.cuda.preferred_blas_library`);
- `split N`: the filters cut in two FFNs whose outputs add (FFN2 of the second through addmm onto the
  first): the first `N * floor(width / N)` filters and the rest. Same result up to rounding; it would
  pay if cuBLAS's tiles left the last wave of the whole width mostly idle (it did not: H200 table);
- `+norm`: the block and then the residual add + LayerNorm kernel (`kernels.add_layer_norm`), what a
  slimmed layer's FFN sublayer costs on the fast path up to now;
- `fused`: the same sublayer as one kernel (`kernels.ffn_add_layer_norm`, widths it takes), checked
  against `+norm`'s output (max abs difference printed per width and kept in the JSON).

Each row also gives the block's TFLOP/s and its time as a fraction of the full-width block, to set
beside its width as a fraction (the FLOPs model assumes the two are equal).

    PYTHONPATH=$PWD python evals/bench_encoder_ffn.py --out evals/results/encoder_ffn   # GPU machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.nn import functional as F
from triton.runtime.errors import OutOfResources

SWEEP = [(m, t, w, s) for m in (16, 32) for t in (128, 256) for w in (4, 8) for s in (2, 3)]
WIDTHS = (8, 32, 64, 128, 176, 256, 384, 512, 640, 768, 1024, 1152, 1536, 1600, 2048, 2104, 2176, 2304,
          2560, 2600, 2768, 3072)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32 * 128)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    p.add_argument("--splits", type=int, nargs="*", default=[1024, 512])
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--sweep", action="store_true",
                   help="also time the fused kernel at each (BLOCK_M, warps, stages) of SWEEP")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    return p.parse_args(argv)


def graph_us(fn, trials: int, replays: int) -> float:
    """Median us per call of `fn` over `trials` timings of a CUDA graph holding `replays` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / replays)
    return statistics.median(times)


def forms(x, w1, b1, w2, b2, norm_weight, norm_bias, splits):
    from compress import kernels
    from compress.kernels import ffn

    width, hidden = w1.shape

    def block():
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    out = {"ffn1": lambda: F.linear(x, w1, b1), "ffn2": lambda h=F.linear(x, w1, b1): F.linear(h, w2, b2),
           "block": block}
    for n in splits:
        cut = n * (width // n)
        if 0 < cut < width:
            out[f"split {n}"] = _split(x, w1, b1, w2, b2, cut)
    out["+norm"] = lambda: kernels.add_layer_norm(block(), x, norm_weight, norm_bias, 1e-5)
    if ffn.supports(hidden, width, x.dtype):
        out["fused"] = lambda: kernels.ffn_add_layer_norm(x, w1, b1, w2, b2, norm_weight, norm_bias, 1e-5)
    return out


def _split(x, w1, b1, w2, b2, cut):
    w1a, w1b, b1a, b1b = w1[:cut], w1[cut:], b1[:cut], b1[cut:]
    w2a, w2b = w2[:, :cut].contiguous(), w2[:, cut:].contiguous()

    def run():
        y = F.linear(F.gelu(F.linear(x, w1a, b1a)), w2a, b2)
        return y.addmm_(F.gelu(F.linear(x, w1b, b1b)), w2b.t())
    return run


@torch.inference_mode()
def run(args) -> dict:
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    h = args.hidden
    x = torch.randn(args.tokens, h, device=dev, dtype=dt)
    norm_weight = 1.0 + 0.1 * torch.randn(h, device=dev, dtype=dt)
    norm_bias = 0.1 * torch.randn(h, device=dev, dtype=dt)
    rows = []
    for width in args.widths:
        w1 = torch.randn(width, h, device=dev, dtype=dt) / h ** 0.5
        b1 = torch.randn(width, device=dev, dtype=dt)
        w2 = torch.randn(h, width, device=dev, dtype=dt) / width ** 0.5
        b2 = torch.randn(h, device=dev, dtype=dt)
        fns = forms(x, w1, b1, w2, b2, norm_weight, norm_bias, args.splits)
        ref = fns["block"]().float()
        row = {"width": width}
        if "fused" in fns:
            row["fused max abs diff"] = (fns["fused"]().float() - fns["+norm"]().float()).abs().max().item()
            assert row["fused max abs diff"] < 0.1, (width, row["fused max abs diff"])
        for name, fn in fns.items():
            if name.startswith("split"):
                err = (fn().float() - ref).abs().max().item()
                assert err < 0.1 * ref.abs().max().item() + 0.05, (width, name, err)
            row[name] = graph_us(fn, args.trials, args.replays)
        if args.sweep and "fused" in fns:
            from compress.kernels import ffn
            row["sweep"] = {}
            for config in SWEEP:
                run = lambda c=config: ffn.ffn_add_layer_norm(x, w1, b1, w2, b2, norm_weight, norm_bias, 1e-5, c)  # noqa: E731
                try:
                    row["sweep"][str(config)] = graph_us(run, args.trials, args.replays)
                except OutOfResources:  # too much shared memory for this tile and stage count
                    continue
            best = min(row["sweep"], key=row["sweep"].get)
            print(f"width {width}: fused default {row['fused']:.2f} us, best {best} {row['sweep'][best]:.2f} us",
                  flush=True)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            row["lt"] = graph_us(fns["block"], args.trials, args.replays)
        finally:
            torch.backends.cuda.preferred_blas_library("cublas")
        row["tflops"] = 4 * args.tokens * h * width / row["block"] / 1e6
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items() if k != "sweep"}),
              flush=True)
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tokens=args.tokens, hidden=h,
                splits=args.splits, command="python evals/bench_encoder_ffn.py " + " ".join(sys.argv[1:]),
                rows=rows)


def markdown(result: dict) -> str:
    full = max(result["rows"], key=lambda r: r["width"])
    cols = ["ffn1", "ffn2", "block", "lt"] + [f"split {n}" for n in result["splits"]] + ["+norm", "fused"]
    lines = [f"# FFN cost against width: {result['tokens']} tokens x hidden {result['hidden']}, bf16", "",
             f"{result['device']}, torch {result['torch']}. Command: `{result['command']}`", "",
             "us per call (graph replays); `block / full` = block time over the widest block's, beside "
             "`width / full`.", "",
             "| width | " + " | ".join(cols) + " | block TFLOP/s | width / full | block / full |",
             "|" + " ---: |" * (len(cols) + 4)]
    for r in result["rows"]:
        cells = [f"{r[c]:.1f}" if c in r else "" for c in cols]
        lines.append(f"| {r['width']} | " + " | ".join(cells) + f" | {r['tflops']:.0f} | "
                     f"{r['width'] / full['width']:.3f} | {r['block'] / full['block']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_encoder_ffn: needs a CUDA device", file=sys.stderr)
        return 2
    result = run(args)
    md = markdown(result)
    print(md)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(md)
        Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    if not __package__:  # run as a file: make the repo root importable (compress.kernels)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())

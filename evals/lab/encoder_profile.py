"""Where a dense encoder and its slimmed child spend GPU time, by kernel kind (issue #2's latency target).

Builds the dense parent with random weights and one slimmed shape recorded in a glue_pruning state file
(as evals/encoder_latency.py does: same builders, same CUDA setup), then per batch size:

- `replay ms`: the forward captured in a CUDA graph, median of replays (evals/encoder_latency.time_cuda);
- kernel time per forward from torch.profiler over `--iters` eager forwards, grouped into GEMM
  (projections), attention, LayerNorm, residual add, GELU and the rest, with launch counts;
- `scaling-only ratio`: dense over slimmed time of the kinds that pruning shrinks (GEMM, attention,
  GELU). It is the speedup the forward would show if every other kernel cost nothing, so a latency
  target above it cannot be met by trimming the fixed work alone.

  PYTHONPATH=$PWD python evals/lab/encoder_profile.py --out evals/results/encoder_profile.md   # GPU machine
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

if not __package__:  # run as a file: make the repo root and evals/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import encoder_latency as latency  # noqa: E402
from compress.errors import UserError, exit_code  # noqa: E402

KINDS = ("gemm", "attention", "layernorm", "add", "gelu", "other")
SCALING = ("gemm", "attention", "gelu")


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel from its name (cuBLAS/nvjet/CUTLASS GEMMs, cuDNN/flash attention, ...)."""
    n = name.lower()
    if any(k in n for k in ("sdpa", "flash", "fmha", "attention")):
        return "attention"
    if "layer_norm" in n or "layernorm" in n:
        return "layernorm"
    if "gelu" in n:
        return "gelu"
    if "add" in n and "elementwise" in n:
        return "add"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "splitkreduce")):
        return "gemm"
    return "other"


@torch.inference_mode()
def kernel_times(model, batch: int, seq: int, iters: int) -> dict:
    """{kind: (us per forward, launches per forward)} over `iters` eager forwards after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    ids = latency.input_ids(model.config, batch, seq, "cuda")
    for _ in range(3):
        model(input_ids=ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            model(input_ids=ids)
        torch.cuda.synchronize()
    us, count = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            kind = kernel_kind(event.name)
            us[kind] += event.device_time / iters
            count[kind] += 1
    return {kind: (us[kind], count[kind] / iters) for kind in KINDS}


@torch.inference_mode()
def kernel_trace(model, batch: int, seq: int) -> list:
    """[(kernel name, us)] of one eager forward, in launch order (after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    ids = latency.input_ids(model.config, batch, seq, "cuda")
    for _ in range(3):
        model(input_ids=ids)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(input_ids=ids)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0]
    events.sort(key=lambda e: e.time_range.start)
    return [(e.name[:90], round(e.device_time, 2)) for e in events]


def profile_model(model, batches, args) -> dict:
    timings = latency.time_shape(model, "cuda", args)  # graph replays in --cuda-dtype; moves back to cpu
    model.to(device="cuda", dtype=latency.CUDA_DTYPES[args.cuda_dtype])
    try:
        return {b: dict(replay_ms=timings[f"b{b}"]["ms"], kernels=kernel_times(model, b, args.seq, args.iters),
                        **({"trace": kernel_trace(model, b, args.seq)} if args.trace else {}))
                for b in batches}
    finally:
        model.to("cpu")
        torch.cuda.empty_cache()


def markdown(result: dict) -> str:
    lines = [f"# Encoder GPU time by kernel kind: {result['model']} dense vs {result['variant']}", "",
             f"{result['device']}, torch {result['torch']}. Command: `{result['command']}`", "",
             f"Slimmed shape: heads {result['heads']}, filters {result['filters']}.", ""]
    for b, rows in result["batches"].items():
        dense, slim = rows["dense"], rows["slim"]
        lines += [f"## Batch {b}, sequence {result['seq']}", "",
                  "| kind | dense us | launches | slimmed us | launches | dense / slimmed |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for kind in KINDS:
            (d, dn), (s, sn) = dense["kernels"][kind], slim["kernels"][kind]
            lines.append(f"| {kind} | {d:.0f} | {dn:.0f} | {s:.0f} | {sn:.0f} | {d / s:.2f}x |" if s > 0 else
                         f"| {kind} | {d:.0f} | {dn:.0f} | {s:.0f} | {sn:.0f} | |")
        total = {k: sum(v[0] for v in rows[k]["kernels"].values()) for k in ("dense", "slim")}
        scaling = {k: sum(rows[k]["kernels"][kind][0] for kind in SCALING) for k in ("dense", "slim")}
        lines += [f"| all kernels | {total['dense']:.0f} | | {total['slim']:.0f} | | "
                  f"{total['dense'] / total['slim']:.2f}x |", "",
                  f"- CUDA-graph replay: dense {dense['replay_ms']:.3f} ms, slimmed {slim['replay_ms']:.3f} ms: "
                  f"**{dense['replay_ms'] / slim['replay_ms']:.2f}x**",
                  f"- scaling-only ratio ({' + '.join(SCALING)}): {scaling['dense']:.0f} / {scaling['slim']:.0f} us = "
                  f"**{scaling['dense'] / scaling['slim']:.2f}x** (the speedup if every other kernel were free)", ""]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mpnet-base", help="base model name (evals/encoder_latency.KNOWN_BASES)")
    p.add_argument("--state", default=str(latency.RESULTS / "glue_pruning_state.json"))
    p.add_argument("--variant", default="mpnet-base-mrpc/fisher-0.5:prune",
                   help="suffix of the state key whose heads and filters give the slimmed shape")
    latency.add_timing_args(p, trials=10)
    p.add_argument("--iters", type=int, default=10, help="eager forwards profiled per model and batch")
    p.add_argument("--out", default=None, help="write the table here (.md) and its data beside it (.json)")
    p.add_argument("--trace", action="store_true", help="also keep every kernel of one forward, in order (.json)")
    return p.parse_args(argv)


def run(args) -> dict:
    if not torch.cuda.is_available():
        raise UserError("encoder_profile needs a CUDA device (it profiles GPU kernels)")
    state = json.loads(Path(args.state).read_text())
    keys = [k for k in state if k.endswith(args.variant)]
    if len(keys) != 1 or "heads" not in state[keys[0]]:
        raise UserError(f"{args.state}: expected one pruned entry ending in {args.variant!r}, found {len(keys)}")
    entry = state[keys[0]]
    config, _ = latency.base_config(args.model)
    dense = latency.dense_model(config)
    slim = latency.slimmed_copy(dense, entry["heads"], entry["filters"], args.filter_multiple)
    args.batches = sorted(set(args.batches), reverse=True)
    rows = {"dense": profile_model(dense, args.batches, args), "slim": profile_model(slim, args.batches, args)}
    return dict(model=args.model, variant=args.variant, heads=entry["heads"], filters=entry["filters"],
                seq=args.seq, device=torch.cuda.get_device_name(), torch=torch.__version__,
                command="python evals/lab/encoder_profile.py " + " ".join(sys.argv[1:]),
                batches={b: {k: rows[k][b] for k in rows} for b in args.batches})


def write(result: dict, out: str | None) -> None:
    md = markdown(result)
    print(md)
    if out:
        Path(out).with_suffix(".md").write_text(md)
        Path(out).with_suffix(".json").write_text(json.dumps(result, indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_code("encoder_profile", lambda: write(run(args), args.out))


if __name__ == "__main__":
    sys.exit(main())

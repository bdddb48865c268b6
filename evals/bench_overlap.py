"""Overlapped vs synchronous decode loop (serve/lookahead.py) on one engine: offline throughput and
batch-1 decode step time, the two loops alternated `--repeats` times so drift shows up as spread.
`--compare pdl` alternates Programmatic Dependent Launch of the decode kernels off and on instead
(`set_options(pdl=False / True)`, kernels/options.py, docs/kernels.md "PDL"), the overlapped loop on in
both; `--compare fusion` the logits, fp32 cast and soft-cap in one launch at batch 1 off and on
(`fused_logits`). The decode graphs are re-captured at each switch because a graph keeps the kernel
options it was captured with. `--decode-config` launches decode attention with one config throughout.

Same workload and models as evals/bench_serve.py (seeded random prompts 128..1024 tokens, 256 output
tokens each, EOS ignored, greedy; a public Gemma shape with random bf16 weights). The loop is switched
between runs through `engine.lookahead.enabled` (EngineConfig.overlap at start-up), so both loops
share the model, the KV cache and the captured CUDA graphs. Batch 1 reports the engine step (median
wall time of `engine.step()`), the graph replay alone and the bandwidth floor, as bench_serve does.

  python evals/bench_overlap.py --model gemma-2-2b                         # GPU machine, ~2 minutes
  python evals/bench_overlap.py --model gemma-2-2b --compare pdl --repeats 3   # PDL off / on (sm90+)
  python evals/bench_overlap.py --model gemma-2-2b --compare fusion --num-requests 64   # fused logits off / on
  python evals/bench_overlap.py --model gemma-3-270m --num-requests 4 --output-len 8 --min-prompt 8 \
      --max-prompt 32 --latency-tokens 8 --max-model-len 256               # smoke run (CPU: fast path on)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import (add_workload_args, copy_bandwidth_gbs, make_prompts, resolve, run_latency,  # noqa: E402
                         run_offline)
from compress.kernels import set_options  # noqa: E402
from compress.kernels.options import parse_decode_config  # noqa: E402


def make_llm(path: Path, args):
    from serve import LLM
    return LLM(str(path), max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               max_model_len=args.max_model_len, enable_prefix_caching=False, fast_path="on", overlap=True)


def set_kernel_options(llm, options: dict) -> None:
    """The kernel options are read at every launch and frozen into a CUDA graph when it is captured, so
    the decode graphs are captured again."""
    set_options(**options)
    graphs = llm.engine.runner.decode_graphs
    if graphs is not None and graphs.graphs:
        graphs.capture()


def one_round(llm, args, prompts, vocab: int, copy_gbs: float, name: str, overlap: bool, options=None) -> dict:
    lookahead = llm.engine.lookahead
    lookahead.enabled = overlap
    if options:
        set_kernel_options(llm, options)
    ahead = lookahead.num_ahead
    row = run_offline(llm, prompts, args.output_len, name)
    row["output_tok_s"] = row["output_tokens"] / row["seconds"]
    prompt_len = min(512, args.max_model_len // 2)
    row.update(run_latency(llm, vocab, copy_gbs, prompt_len, args.latency_tokens))
    row["steps_ahead"] = lookahead.num_ahead - ahead
    return row


def print_table(rows: list[dict]) -> None:
    print("| run | output tok/s | offline s | b1 step ms | b1 replay ms | floor ms | step / floor | steps ahead |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ratio = r["step_ms"] / r["floor_ms"]
        print(f"| {r['name']} | {r['output_tok_s']:,.0f} | {r['seconds']:.2f} | {r['step_ms']:.3f} | "
              f"{r['replay_ms']:.3f} | {r['floor_ms']:.3f} | {ratio:.2f}x | {r['steps_ahead']} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma-2-2b", help="shape name (evals/serve_models.py) or model directory")
    add_workload_args(p)
    p.add_argument("--latency-tokens", type=int, default=128, help="batch-1 output tokens")
    p.add_argument("--repeats", type=int, default=2, help="rounds of (off, on)")
    p.add_argument("--compare", choices=["overlap", "pdl", "fusion"], default="overlap",
                   help="what changes between the runs of a round: the overlapped loop (off, on), PDL of the decode "
                        "kernels (off, on), or the batch-1 logits in one launch (fused_logits off, on)")
    p.add_argument("--decode-config", type=parse_decode_config, default=None, metavar="BN,WARPS,STAGES,PER_SM",
                   help="launch decode attention with this config instead of the tuned ones (kernels/decode.py)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    path, config = resolve(args, args.model)
    vocab = config.get("text_config", config)["vocab_size"]
    prompts = make_prompts(args.num_requests, args.min_prompt, args.max_prompt, vocab, args.seed)
    copy_gbs = copy_bandwidth_gbs() if torch.cuda.is_available() else float("nan")
    set_options(decode_config=args.decode_config)      # before the engine captures its graphs
    llm = make_llm(path, args)
    if args.compare == "overlap":
        settings = [("overlap off", dict(overlap=False)), ("overlap on", dict(overlap=True))]
    else:
        name, option = {"pdl": ("pdl", "pdl"), "fusion": ("fused logits", "fused_logits")}[args.compare]
        settings = [(f"{name} {v}", dict(overlap=True, options={option: v == "on"})) for v in ("off", "on")]
    rows = [one_round(llm, args, prompts, vocab, copy_gbs, name, **kw)
            for _ in range(args.repeats) for name, kw in settings]
    print(f"{args.model} on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print_table(rows)
    if args.json:
        record = {"args": vars(args) | {"json": str(args.json)}, "rows": rows}
        args.json.write_text(json.dumps(record, indent=1, default=vars))     # a DecodeConfig as its fields
    return rows


if __name__ == "__main__":
    main()

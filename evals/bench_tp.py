"""Tensor-parallel serving benchmark (issue 37): Gemma-2-9B- and Gemma-2-27B-shaped random bf16 weights
at N = 1, 2, 4 GPUs: output tok/s on the serving workload, the batch-1 decode step, and the share of
that step rank 0 spends in all-reduce / all-gather. Every N runs the eager path (`fast_path="off"`):
the fast path and CUDA graphs are single-GPU for now, so N = 1 on the fast path is timed beside it.

  python evals/bench_tp.py --model gemma-2-9b --model gemma-2-27b --sizes 1,2,4 --out evals/results/serve_tp.md

A size that does not fit (out of memory) or has too few GPUs is recorded as an error row, not a crash.
Collective share: on the batch-1 steps, rank 0's time inside each collective (device synchronised
before and after, so it includes waiting for the slowest rank) over the step time measured the same way.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve import _vocab_size, add_workload_args, make_prompts, resolve, run_offline, sync  # noqa: E402


class CollectiveTimer:
    """Wraps torch.distributed's all_reduce and all_gather in this process (rank 0) with timers."""

    NAMES = ("all_reduce", "all_gather")

    def __init__(self):
        self.seconds, self.saved = 0.0, {}

    def __enter__(self):
        for name in self.NAMES:
            self.saved[name] = original = getattr(dist, name)
            setattr(dist, name, self._timed(original))
        return self

    def _timed(self, original):
        def call(*args, **kwargs):
            sync()
            start = time.perf_counter()
            result = original(*args, **kwargs)
            sync()
            self.seconds += time.perf_counter() - start
            return result
        return call

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(dist, name, original)


def batch1_steps(llm, vocab: int, prompt_len: int, output_len: int) -> list[float]:
    from serve import SamplingParams
    engine = llm.engine
    engine.add_request(make_prompts(1, prompt_len, prompt_len, vocab, seed=7)[0],
                       SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    engine.step()                        # the prefill
    steps = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        sync()
        steps.append(time.perf_counter() - start)
    return steps


def run_latency(llm, vocab: int, prompt_len: int, output_len: int) -> dict:
    step_s = statistics.median(batch1_steps(llm, vocab, prompt_len, output_len))
    with CollectiveTimer() as timer:
        timed = batch1_steps(llm, vocab, prompt_len, output_len)
    return {"step_ms": step_s * 1e3, "collective_share": timer.seconds / sum(timed) if llm_is_tp(llm) else 0.0}


def llm_is_tp(llm) -> bool:
    return llm.engine.config.tensor_parallel_size > 1


def bench_one(args, name: str, size: int, fast_path: str, prompts) -> dict:
    from serve import LLM
    row = {"model": name, "tp": size, "fast_path": fast_path}
    path, _ = resolve(args, name)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()         # the random weights drawn on GPU 0 (first run only) would shrink the KV
    llm = None
    try:
        llm = LLM(str(path), tensor_parallel_size=size, fast_path=fast_path, device=args.device,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=False)
        offline = run_offline(llm, prompts, args.output_len, name)
        row.update(output_tok_s=offline["output_tokens"] / offline["seconds"], **offline)
        row.update(run_latency(llm, _vocab_size(name), args.latency_prompt, args.latency_output))
    except (ValueError, RuntimeError, torch.OutOfMemoryError) as err:
        row["error"] = f"{type(err).__name__}: {err}"[:300]
    finally:
        if llm is not None:
            llm.close()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def report(rows: list[dict], command: str) -> str:
    lines = [f"`{command}`", "", "| model | N | path | output tok/s | batch-1 step ms | collective share | error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tp']} | {'fast' if r['fast_path'] == 'auto' else 'eager'} | "
                     f"{r.get('output_tok_s', float('nan')):.1f} | {r.get('step_ms', float('nan')):.2f} | "
                     f"{r.get('collective_share', float('nan')):.1%} | {r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for name in args.model:
        prompts = make_prompts(args.num_requests, args.min_prompt, args.max_prompt, _vocab_size(name), args.seed)
        runs = [(1, "auto")] if args.device != "cpu" else []
        for size, fast_path in runs + [(int(n), "off") for n in args.sizes.split(",")]:
            rows.append(bench_one(args, name, size, fast_path, prompts))
            print(json.dumps(rows[-1]), flush=True)
    command = "python evals/bench_tp.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(rows, command)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    return 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="shape name or model directory (repeatable)")
    p.add_argument("--sizes", default="1,2,4", help="tensor-parallel sizes, comma-separated")
    p.add_argument("--device", default="auto", help="auto (cuda when present) or cpu (gloo, for tests)")
    p.add_argument("--kv-cache-memory", type=float, default=None)
    p.add_argument("--latency-prompt", type=int, default=512)
    p.add_argument("--latency-output", type=int, default=64)
    p.add_argument("--out", default=None, help="write the markdown report here (and .json beside it)")
    add_workload_args(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())

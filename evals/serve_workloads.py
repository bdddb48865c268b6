"""The workloads of the serving benchmarks: random prompts of a length range, the `MIN:MAX:OUT` mixes and
`MODEL:MIN:MAX:OUT:MAX_MODEL_LEN[:NUM]` workloads of the command lines, and the workload and engine-limit
flags that bench_serve, bench_overlap, bench_tp and profile_serve share."""

from __future__ import annotations

import argparse
import random


def make_prompts(num: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(num)]


def parse_mix(text: str) -> tuple[int, int, int]:
    """`MIN:MAX:OUT` prompt lengths and output tokens of a workload mix."""
    lo, hi, out = (int(v) for v in text.split(":"))
    if not 1 <= lo <= hi or out < 1:
        raise argparse.ArgumentTypeError(f"a mix is MIN:MAX:OUT with 1 <= MIN <= MAX and OUT >= 1, got {text!r}")
    return lo, hi, out


def parse_workload(text: str) -> dict:
    """`MODEL:MIN:MAX:OUT:MAX_MODEL_LEN[:NUM]`: NUM prompts (default 256) of MIN..MAX tokens, OUT output
    tokens each, at max_model_len MAX_MODEL_LEN."""
    parts = text.split(":")
    try:
        lo, hi, out, length, *num = (int(v) for v in parts[1:])
        num = num[0] if num else 256
    except ValueError:
        raise argparse.ArgumentTypeError(f"a workload is MODEL:MIN:MAX:OUT:MAX_MODEL_LEN[:NUM], got {text!r}") from None
    if len(parts) > 6 or not 1 <= lo <= hi or out < 1 or num < 1 or hi + out > length:
        raise argparse.ArgumentTypeError(f"a workload needs 1 <= MIN <= MAX, MAX + OUT <= MAX_MODEL_LEN, got {text!r}")
    return {"model": parts[0], "min_prompt": lo, "max_prompt": hi, "output_len": out, "max_model_len": length,
            "num_requests": num, "label": f"{parts[0]}, {num} x {lo}-{hi} -> {out}, len {length}"}


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The offline workload and engine limits shared by bench_serve, bench_overlap and profile_serve."""
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-prompt", type=int, default=128)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--workdir", default="/tmp/bench_serve_models", help="where random checkpoints are written")

"""Host time per decode step, phase by phase, with the model forward stubbed out (CPU only).

Drives the real engine loop (Scheduler, BlockManager, ModelRunner/DecodeGraphs packing, sampler, the
engine's append/finish/output work) over a tiny random Gemma 2 checkpoint whose KV groups match
Gemma-2-2B's (one full-attention group, one sliding group of 4096), with the model replaced by a stub that
returns logits whose argmax is a fixed token. What is left is the host work the GPU waits on in the
offline benchmark of evals/bench_serve.py. Phases per step: schedule (scheduler.schedule); run (pack
metadata + copy + stub forward); sample (argmax + the one device->host copy); post (everything else in
`step`: advance, append, stop checks, outputs). Absolute numbers depend on the CPU; compare runs on the
same machine (before/after ratios).

  python evals/host_overhead.py                               # 256 sequences, prompts 128..1024, fast path
  python evals/host_overhead.py --fast-path off --stream      # the eager `prepare` path, streamed outputs
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PHASES = ("schedule", "run", "sample")


class StubModel:
    """Stands in for the Gemma model: no compute, logits [T, V] with every row's argmax at `token`."""

    def __init__(self, vocab_size: int, token: int):
        self.row = torch.zeros(vocab_size)
        self.row[token] = 1.0

    def __call__(self, input_ids, positions, meta, kv_caches, backend):
        return torch.zeros(input_ids.shape[0], 1)

    def compute_logits(self, hidden):
        return self.row.expand(hidden.shape[0], -1)


def build_checkpoint(directory: Path, max_len: int) -> Path:
    from serve_fixtures import gemma2_config, random_model, save_model
    config = gemma2_config(num_layers=2)
    config.sliding_window, config.max_position_embeddings = 4096, max_len
    return save_model(random_model(config), directory / "tiny-gemma2")


class PhaseClock:
    """Host timers around scheduler.schedule, runner.run and the engine's sample call."""

    def __init__(self, engine):
        import serve.engine as engine_module
        self.totals = collections.defaultdict(float)
        self._wrap(engine.scheduler, "schedule")
        self._wrap(engine.runner, "run")
        self._wrap(engine_module, "sample")

    def _wrap(self, obj, name: str) -> None:
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self.totals[name] += time.perf_counter() - start
            return out
        setattr(obj, name, timed)


def make_engine(path: Path, args):
    from serve.config import EngineConfig
    from serve.engine import LLMEngine
    config = EngineConfig(model=str(path), max_num_seqs=args.num_seqs, max_num_batched_tokens=args.max_batched_tokens,
                          max_model_len=args.max_prompt + args.output_len + 1, block_size=args.block_size,
                          enable_prefix_caching=False, device="cpu", dtype="float32", fast_path=args.fast_path,
                          num_kv_blocks=args.num_seqs * -(-(args.max_prompt + args.output_len) // args.block_size))
    engine = LLMEngine(config)
    engine.stream_outputs = args.stream
    engine.runner.model = StubModel(engine.runner.spec.vocab_size, token=7)
    return engine


def measure(engine, args) -> dict:
    from serve.sampling_params import SamplingParams
    rng = random.Random(args.seed)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for _ in range(args.num_seqs):
        engine.add_request([rng.randrange(5, 300) for _ in range(rng.randint(args.min_prompt, args.max_prompt))], params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running):
        engine.step()                                   # prefill until every sequence decodes
    clock, walls = PhaseClock(engine), []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    n = len(walls)
    result = {phase: 1e3 * clock.totals[phase] / n for phase in PHASES}
    result["post"] = 1e3 * sum(walls) / n - sum(result.values())
    result["total"] = 1e3 * sum(walls) / n
    result["batch"] = len(engine.scheduler.running)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--min-prompt", type=int, default=128)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=100, help="decode steps timed (fewer than --output-len)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--fast-path", choices=["on", "off"], default="on")
    p.add_argument("--stream", action="store_true", help="stream outputs (server) instead of offline batches")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs per phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    if args.steps >= args.output_len:
        p.error("--steps must be below --output-len so no sequence finishes inside the window")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp), args.max_prompt + args.output_len + 1)
        for _ in range(args.repeats):
            runs.append(measure(make_engine(path, args), args))
    best = {k: min(r[k] for r in runs) for k in (*PHASES, "post", "total")}
    print(f"host ms per decode step at {runs[0]['batch']} sequences (fast path {args.fast_path}, "
          f"stream {args.stream}, best of {args.repeats}):")
    print(" | ".join(f"{k} {v:.3f}" for k, v in best.items()))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "best_ms": best}, indent=2))
    return best


if __name__ == "__main__":
    main()

"""Host time per decode step, phase by phase, with the model forward stubbed out (CPU only).

Drives the real engine loop (Scheduler, BlockManager, ModelRunner/DecodeGraphs packing, sampler, the
engine's append/finish/output work) over a tiny random Gemma 2 checkpoint whose KV groups match
Gemma-2-2B's (one full-attention group, one sliding group of 4096), with the model replaced by a stub that
returns logits whose argmax is a fixed token. What is left is the host work of the offline benchmark
of evals/bench_serve.py.

Synchronous loop (`--overlap off`), all of it while the GPU waits: schedule (scheduler.schedule); run
(pack metadata + copy + stub forward); sample (argmax + the one device->host copy); post (everything
else in `step`: advance, append, stop checks, outputs).
Overlapped loop (`--overlap on`, serve/lookahead.py), where the GPU runs step N while the host works:
ahead (from the start of `step` until step N+1 is queued: slot reservation, then pack: pack + copy +
gather + stub forward, then the sampling kernels); behind (read step N's tokens, append, stop checks,
advance N+1, outputs). On the GPU, step N+1 is queued before step N ends, and step N+2 before N+1 ends,
as long as ahead + behind < the GPU time of a step: then no host time is exposed, otherwise the excess
is. The gap itself cannot be measured on the CPU. Absolute numbers depend on the CPU; compare runs on
the same machine (before/after ratios).

  python evals/lab/host_overhead.py                               # 256 sequences, prompts 128..1024, both loops
  python evals/lab/host_overhead.py --num-seqs 1 --steps 100      # batch 1
  python evals/lab/host_overhead.py --fast-path off --stream      # the eager `prepare` path, streamed outputs
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

SYNC_PHASES = ("schedule", "run", "sample")        # + post: the rest of the step
OVERLAP_PHASES = ("ahead", "pack")                 # + behind; pack is part of ahead


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
    """Host timers: scheduler.schedule, runner.run and the engine's sample call (synchronous loop), or
    the launch of the next step and its packing (overlapped loop)."""

    def __init__(self, engine, overlap: bool):
        import serve.engine as engine_module
        self.totals = collections.defaultdict(float)
        if overlap:
            self._wrap(engine.lookahead, "launch_next", "ahead")
            self._wrap(engine.runner, "run_ahead", "pack")
        else:
            self._wrap(engine.scheduler, "schedule")
            self._wrap(engine.runner, "run")
            self._wrap(engine_module, "sample")

    def _wrap(self, obj, name: str, label: str | None = None) -> None:
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            self.totals[label or name] += time.perf_counter() - start
            return out
        setattr(obj, name, timed)


def make_engine(path: Path, args, overlap: bool):
    from serve.config import EngineConfig
    from serve.engine import LLMEngine
    max_len = args.max_prompt + args.output_len + 1
    config = EngineConfig(model=str(path), max_num_seqs=args.num_seqs, max_num_batched_tokens=args.max_batched_tokens,
                          max_model_len=max_len, block_size=args.block_size, enable_prefix_caching=False,
                          device="cpu", dtype="float32", fast_path=args.fast_path, overlap=overlap,
                          num_kv_blocks=args.num_seqs * -(-max_len // args.block_size))
    engine = LLMEngine(config)
    engine.stream_outputs = args.stream
    engine.runner.model = StubModel(engine.runner.spec.vocab_size, token=7)
    return engine


def measure(engine, args, overlap: bool) -> dict:
    from serve.sampling_params import SamplingParams
    rng = random.Random(args.seed)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for _ in range(args.num_seqs):
        engine.add_request([rng.randrange(5, 300) for _ in range(rng.randint(args.min_prompt, args.max_prompt))], params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running):
        engine.step()                                   # prefill until every sequence decodes
    clock, walls = PhaseClock(engine, overlap), []
    ahead_before = engine.lookahead.num_ahead
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    n, total = len(walls), 1e3 * sum(walls) / len(walls)
    result = {phase: 1e3 * clock.totals[phase] / n for phase in (OVERLAP_PHASES if overlap else SYNC_PHASES)}
    if overlap:
        result["behind"] = total - result["ahead"]
    else:
        result["post"] = total - sum(result.values())
    result["total"] = total
    result["batch"] = len(engine.scheduler.running)
    result["ahead_steps"] = engine.lookahead.num_ahead - ahead_before
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
    p.add_argument("--overlap", choices=["on", "off", "both"], default="both",
                   help="the overlapped decode loop (needs the fast path), the synchronous one, or both")
    p.add_argument("--stream", action="store_true", help="stream outputs (server) instead of offline batches")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs per phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    if args.steps >= args.output_len:
        p.error("--steps must be below --output-len so no sequence finishes inside the window")
    return args


def run_loop(path: Path, args, overlap: bool) -> dict:
    """Best of `--repeats` runs per phase (ms per step), printed."""
    runs = [measure(make_engine(path, args, overlap), args, overlap) for _ in range(args.repeats)]
    keys = [k for k in runs[0] if k not in ("batch", "ahead_steps")]
    best = {k: min(r[k] for r in runs) for k in keys}
    loop = "overlapped" if overlap else "synchronous"
    print(f"{loop} loop, host ms per decode step at {runs[0]['batch']} sequences (fast path {args.fast_path}, "
          f"stream {args.stream}, best of {args.repeats}; {runs[0]['ahead_steps']}/{args.steps} steps launched ahead):")
    print(" | ".join(f"{k} {v:.3f}" for k, v in best.items()))
    return best


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    loops = {"on": [True], "off": [False], "both": [False, True]}[args.overlap]
    if args.fast_path == "off":
        loops = [False]          # the overlapped loop runs on the fast path's decode buffers only
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(Path(tmp), args.max_prompt + args.output_len + 1)
        best = {("overlap" if overlap else "sync"): run_loop(path, args, overlap) for overlap in loops}
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "best_ms": best}, indent=2))
    return best


if __name__ == "__main__":
    main()

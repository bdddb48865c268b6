"""Where the time of the offline serving workload goes: per-step host phases and the GPU kernels.

Runs the `evals/bench_serve.py offline` workload once with the engine's step phases timed on the host
(schedule; run = pack + launch; sample = wait for the GPU + argmax + copy; post = the rest of the step:
append, finish), steps grouped by kind (pure decode, mixed/prefill), and the wall time of every step.
torch.profiler windows print the kernels by GPU time: over `--profile-steps` pure decode steps at full
batch, and optionally over the first `--profile-first` (prefill) steps.

The engine runs the synchronous decode loop (overlap=False): with steps launched ahead
(serve/lookahead.py) a step's GPU work lands in the next step's host phases, so the phase split would
not mean what it says. `evals/bench_overlap.py` measures what the overlap buys.

  python evals/lab/profile_serve.py --model gemma-2-2b                     # GPU machine
  python evals/lab/profile_serve.py --model gemma-3-270m --num-requests 8 --output-len 8 --max-prompt 64  # smoke
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_serve import add_workload_args, make_prompts, resolve, sync  # noqa: E402


class StepClock:
    """Wraps an engine's scheduler.schedule, runner.run and the sampler with host timers."""

    def __init__(self, engine):
        import serve.engine as engine_module

        self.engine = engine
        self.phases = collections.defaultdict(float)
        self.kinds = collections.defaultdict(lambda: collections.Counter())
        self.walls: dict[str, list[float]] = {}
        self.last_batch = None
        self.originals = []
        self._wrap(engine.scheduler, "schedule")
        self._wrap(engine.runner, "run")
        self._wrap(engine_module, "sample")

    def _wrap(self, obj, name: str) -> None:
        original = getattr(obj, name)
        self.originals.append((obj, name, original))

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = original(*a, **k)
            self.phases[name] += time.perf_counter() - t0
            if name == "schedule":
                self.last_batch = out
            return out

        setattr(obj, name, timed)

    def step(self) -> None:
        before = dict(self.phases)
        t0 = time.perf_counter()
        self.engine.step()
        wall = time.perf_counter() - t0
        batch = self.last_batch
        if batch is None or not batch.seqs:
            return
        decode = all(n == 1 for n in batch.num_new_tokens)
        kind = "decode" if decode else "mixed/prefill"
        stats = self.kinds[kind]
        stats["steps"] += 1
        stats["wall_s"] += wall
        stats["tokens"] += sum(batch.num_new_tokens)
        stats["seqs"] += len(batch)
        spent = {phase: self.phases[phase] - before.get(phase, 0.0) for phase in ("schedule", "run", "sample")}
        for phase, seconds in spent.items():
            stats[phase + "_s"] += seconds
        stats["post_s"] += wall - sum(spent.values())
        self.walls.setdefault(kind, []).append(round(wall * 1e3, 1))

    def restore(self) -> None:
        for obj, name, original in self.originals:
            setattr(obj, name, original)


def run(args) -> dict:
    from serve import LLM, SamplingParams

    path, config = resolve(args, args.model, args.slim)
    llm = LLM(str(path), max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, enable_prefix_caching=False, overlap=False)
    engine = llm.engine
    prompts = make_prompts(args.num_requests, args.min_prompt, args.max_prompt, config["vocab_size"], args.seed)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))   # warm-up
    clock = StepClock(engine)
    for p in prompts:
        engine.add_request(p, params)
    sync()
    start = time.perf_counter()
    profiled, done_profiling = None, False
    if args.profile_first:
        profile_steps(clock, args.profile_first)
    while engine.has_unfinished_requests():
        full = len(engine.scheduler.running) >= min(args.max_num_seqs, args.num_requests)
        if not done_profiling and full and not engine.scheduler.waiting:
            profiled, done_profiling = profile_steps(clock, args.profile_steps), True
            continue
        clock.step()
    sync()
    total = time.perf_counter() - start
    clock.restore()
    out_tokens = args.num_requests * args.output_len
    result = {"model": args.model, "seconds": total, "output_tok_s": out_tokens / total,
              "kinds": {k: dict(v) for k, v in clock.kinds.items()}, "profile": profiled,
              "preemptions": engine.scheduler.num_preemptions, "step_ms": clock.walls}
    print_summary(result)
    return result


def profile_steps(clock: StepClock, steps: int) -> str | None:
    """Kernel table of `steps` decode steps at full batch (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            clock.step()
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(table, flush=True)
    return table


def print_summary(result: dict) -> None:
    print(f"\n{result['model']}: {result['seconds']:.2f} s, {result['output_tok_s']:,.0f} output tok/s, "
          f"preemptions {result['preemptions']}")
    print("| kind | steps | wall s | ms/step | seqs/step | tokens/step | schedule ms | run ms | sample ms | post ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, s in result["kinds"].items():
        n = max(s["steps"], 1)
        print(f"| {kind} | {s['steps']} | {s['wall_s']:.2f} | {1e3 * s['wall_s'] / n:.2f} | {s['seqs'] / n:.0f} | "
              f"{s['tokens'] / n:.0f} | {1e3 * s['schedule_s'] / n:.2f} | {1e3 * s['run_s'] / n:.2f} | "
              f"{1e3 * s['sample_s'] / n:.2f} | {1e3 * s['post_s'] / n:.2f} |")
    for kind, walls in result["step_ms"].items():
        print(f"{kind} step ms, first 30: {walls[:30]}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-2-2b")
    add_workload_args(p)
    p.add_argument("--profile-steps", type=int, default=5, help="decode steps profiled at full batch")
    p.add_argument("--profile-first", type=int, default=0, help="also profile the first N steps (prefill)")
    p.add_argument("--slim", type=float, default=None, help="profile the slimmed sibling of a shape name instead")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))

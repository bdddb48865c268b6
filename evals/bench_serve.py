"""Serving benchmark of the runtime in serve/ (issue 5): offline throughput, batch-1 decode against its
bandwidth floor, online latency over HTTP, and Hugging Face baselines in the same run.

Workload (defaults): 256 seeded random prompts, lengths uniform in 128..1024 tokens, 256 output tokens
each, EOS ignored, greedy. Models: a directory, or a public Gemma shape with seeded random bf16 weights
(evals/serve_models.py: gemma-2-2b, gemma-3-1b, gemma-3-4b, gemma-3-270m), optionally with a slimmed
sibling (`--slim 0.6`: heads halved, filters cut to 0.6 of the layer FLOPs) timed next to its parent.
Batch-1 floor: bytes one decode step must read (every weight once, the embedding as the output
projection, plus the KV each layer attends to) over the measured device-to-device copy bandwidth.
With `--slim`, `--mix MIN:MAX:OUT` and `--grid-max-model-len N` add a grid: the parent and its slimmed
sibling on every mix (the default workload first) at every context length, each engine built after
the last was freed, with its decode mode (CUDA graphs captured or not) in the table; `--serve-check`
also starts `compress serve` of the sibling at each grid length (health, one completion, start-up log).
`--compare vllm` runs vLLM (evals/bench_serve_vllm.py, a process of its own after the runtime's engine
is freed) on the same checkpoint, prompts and limits: offline, batch-1, online at every `--rate`, and
every `--workload`; where vLLM does not import, its rows say "not run: <the import error>".
`--budget-s` stops starting steps after that long and `--resume` goes on from --out's JSON, so one run
can span several calls of a machine that limits each call's time.

  python evals/bench_serve.py offline --model gemma-2-2b --compare hf --slim 0.6
  python evals/bench_serve.py online --model gemma-2-2b --rate 8
  python evals/bench_serve.py suite --compare vllm --vllm-path /root/vllm-site --rate 4 --rate 16 \
      --workload gemma-2-2b:32:2048:384:4096:512 --out evals/results/serve_vs_vllm.md    # evals/serve_vs_vllm.sh
  python evals/bench_serve.py suite --out evals/results/serve_gpu.md      # everything, GPU machine
  python evals/bench_serve.py offline --slim 0.6 --mix 32:1800:384 --grid-max-model-len 4096 --grid-max-model-len 8192
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_serve_report import write_report  # noqa: E402
from serve_models import SHAPES, build  # noqa: E402
from serve_workloads import add_workload_args, make_prompts, parse_mix, parse_workload  # noqa: E402,F401


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth_gbs(num_bytes: int = 2**30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20 eager copies)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * num_bytes / statistics.median(times[5:]) / 1e9


def resolve(args, name: str, slim: float | None = None) -> tuple[Path, dict]:
    if name in SHAPES:
        return build(name, Path(args.workdir), "cuda" if torch.cuda.is_available() else "cpu", slim)
    if slim is not None:
        raise ValueError("--slim needs a shape name (the slimmed sibling is cut from its random weights)")
    return Path(name), json.loads((Path(name) / "config.json").read_text())


def _vocab_size(name: str) -> int:
    if name in SHAPES:
        return SHAPES[name]["vocab_size"]
    config = json.loads((Path(name) / "config.json").read_text())
    return config.get("text_config", config)["vocab_size"]


def make_llm(path, args, max_model_len: int | None = None):
    """The engine on its default (fast) path. A decode-graph capture that fails is a start-up error
    (GraphCaptureError), reported as this step's failure, never an eager fallback."""
    from serve import LLM
    from serve.config import parse_kv_cache_memory
    memory = parse_kv_cache_memory(args.kv_cache_memory) if args.kv_cache_memory else {}
    return LLM(str(path), max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               max_model_len=max_model_len or args.max_model_len, enable_prefix_caching=False, **memory)


def engine_info(llm) -> dict:
    """What start-up decided: decode graphs captured (0: eager), KV tokens, the start-up log."""
    engine = llm.engine
    return {"max_model_len": engine.max_model_len, "graphs": engine.runner.num_graphs,
            "kv_tokens": engine.kv_cache_tokens, "startup": engine.startup_report}


def run_offline(llm, prompts, output_len: int, name: str) -> dict:
    from serve import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))   # warm-up
    sync()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    sync()
    seconds = time.perf_counter() - start
    return {"name": name, "seconds": seconds, "requests": len(prompts), "prompt_tokens": sum(map(len, prompts)),
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def floor_bytes(llm, context: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one batch-1 decode step at `context` tokens must read."""
    model, spec = llm.engine.runner.model, llm.engine.runner.spec
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = 0
    for i, window in enumerate(spec.sliding_windows):
        span = context if window is None else min(context, window)
        kv += 2 * spec.num_key_value_heads[i] * spec.head_dim * span * model.model.embed_tokens.weight.element_size()
    return weights, kv


def run_latency(llm, vocab: int, copy_gbs: float, prompt_len: int = 512, output_len: int = 128) -> dict:
    """Batch-1 decode: engine step wall time, graph replay time (events), and the floor."""
    from serve import SamplingParams
    engine = llm.engine
    prompt = make_prompts(1, prompt_len, prompt_len, vocab, seed=7)[0]
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    steps = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    step_s = statistics.median(steps[1:])
    replay_s = float("nan")
    graphs = engine.runner.decode_graphs
    if graphs is not None and (1, 1) in graphs.graphs:       # (batch bucket, query length)
        replay_s = _time_replay(graphs.graphs[(1, 1)])
    weights, kv = floor_bytes(llm, prompt_len + output_len // 2)
    floor_s = (weights + kv) / (copy_gbs * 1e9)
    return {"step_ms": step_s * 1e3, "replay_ms": replay_s * 1e3, "floor_ms": floor_s * 1e3,
            "weight_gb": weights / 1e9, "kv_mb": kv / 1e6, "context": prompt_len + output_len // 2}


def _time_replay(graph, reps: int = 50) -> float:
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / reps


def release_memory() -> None:
    """Give a dropped engine's memory back (its runner and decode graphs refer to each other: gc)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_model(args, name: str, results: dict, prompts, slim: float | None = None, latency: bool = True) -> None:
    path, config = resolve(args, name, slim)
    label = name if slim is None else f"{name} slimmed (FLOPs {slim})"
    start = time.perf_counter()
    llm = make_llm(path, args)
    init_s = time.perf_counter() - start
    row = run_offline(llm, prompts, args.output_len, label)
    row.update(init_s=init_s, **engine_info(llm))
    results["offline"].append(row)
    compared = args.compare == "vllm" and slim is None and name == (args.model or ["gemma-2-2b"])[0]
    if compared:
        results["vs"].append({"workload": main_workload(args, name), "system": "serve", **row, "name": "serve"})
    print(json.dumps(row), flush=True)
    if args.compare == "hf" and slim is None and not results["hf"]:
        subset = prompts[:args.hf_requests]
        results["hf"].append(run_offline(llm, subset, args.output_len, f"serve ({name}, same {len(subset)} prompts)"))
    if latency:
        prompt_len, output_len = min(512, args.max_model_len // 2), min(128, args.max_model_len // 4)
        lat = {"model": label, **run_latency(llm, config["vocab_size"], results["copy_gbs"], prompt_len, output_len)}
        results["latency"].append(lat)
        if compared:
            results["vs_latency"].append({**lat, "model": name, "system": "serve"})
        print(json.dumps(lat), flush=True)
    del llm
    release_memory()


def bench_pair(args, name: str, results: dict, mix: tuple[int, int, int], max_model_len: int) -> None:
    """The parent and its slimmed sibling on one mix at one context length (a row of the grid)."""
    lo, hi, output_len = mix
    prompts = make_prompts(args.num_requests, lo, hi, _vocab_size(name), args.seed)
    row = {"model": name, "mix": f"{lo}-{hi} -> {output_len}", "max_model_len": max_model_len}
    results["grid"].append(row)
    for key, slim in (("parent", None), ("slim", args.slim)):
        path, _ = resolve(args, name, slim)
        start = time.perf_counter()
        llm = make_llm(path, args, max_model_len)
        init_s = time.perf_counter() - start
        row[key] = {**run_offline(llm, prompts, output_len, key), "init_s": init_s, **engine_info(llm)}
        print(json.dumps(row[key]), flush=True)
        del llm
        release_memory()


def serve_check(args, name: str, results: dict, max_model_len: int) -> None:
    """A fresh `compress serve` of the slimmed sibling: start-up log, health, one completion, metrics."""
    from bench_serve_online import check_server
    path, _ = resolve(args, name, args.slim)
    server_args = ["--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens",
                   str(args.max_num_batched_tokens), "--max-model-len", str(max_model_len)]
    row = {"model": f"{name} slimmed (FLOPs {args.slim})", "max_model_len": max_model_len,
           **check_server(path, server_args)}
    results["serve_check"].append(row)
    print(json.dumps(row), flush=True)


def bench_hf(args, name: str, results: dict, prompts) -> None:
    from bench_serve_hf import hf_generate_batch, hf_padded_generate
    path, _ = resolve(args, name)
    subset = prompts[:args.hf_requests]
    for fn in (hf_generate_batch, hf_padded_generate):
        try:
            row = fn(path, subset, args.output_len)
        except Exception as err:  # a baseline failing must not lose the rest of the run
            row = {"name": fn.__name__, "error": f"{type(err).__name__}: {err}"[:300]}
        results["hf"].append(row)
        print(json.dumps(row), flush=True)


def bench_online(args, name: str, results: dict, prompts, rate: float) -> None:
    from bench_serve_online import run_online
    path, _ = resolve(args, name)
    server_args = ["--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens",
                   str(args.max_num_batched_tokens), "--max-model-len", str(args.max_model_len),
                   "--no-prefix-caching"]
    row = {"model": name, **run_online(path, name, prompts[:args.online_requests], args.output_len, rate,
                                       server_args, args.seed)}
    results["online"].append(row)
    if args.compare == "vllm":
        results["vs_online"].append({"system": "serve", **row})
    print(json.dumps(row), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = start_results(args)
    models = args.model or (["gemma-2-2b", "gemma-3-1b", "gemma-3-4b", "gemma-3-270m"] if args.mode == "suite"
                            else ["gemma-2-2b"])
    vocab = min(_vocab_size(m) for m in models)
    prompts = make_prompts(args.num_requests, args.min_prompt, args.max_prompt, vocab, args.seed)
    begin, steps, ran = time.perf_counter(), plan(args, models), 0
    for label, fn in steps:
        if label in results["done"]:
            continue
        if args.budget_s and ran and time.perf_counter() - begin > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: run the same command with --resume for the rest", flush=True)
            break
        try:
            fn(results, prompts)
        except Exception as err:  # report what ran; say what failed
            results.setdefault("errors", []).append(f"{label}: {type(err).__name__}: {err}"[:400])
            print("FAILED", label, repr(err)[:400], flush=True)
        results["done"].append(label)
        ran += 1
        if args.out:
            write_report(results, args.out)
    print(json.dumps({k: v for k, v in results.items() if k != "args"}, indent=1, default=str))
    if all(label in results["done"] for label, _ in steps):
        print("all steps done", flush=True)
    return 0


def start_results(args) -> dict:
    """A fresh record of the run, or (--resume) the one at --out's JSON, whose finished steps are skipped.
    With --compare vllm, whether vLLM imports (its version, or the one-line reason it does not)."""
    saved = Path(args.out).with_suffix(".json") if args.out else None
    if args.resume and saved and saved.is_file():
        results = json.loads(saved.read_text())
        results["calls"] = results.get("calls", 1) + 1
        return results
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "command": "python " + " ".join(sys.argv), "args": vars(args),
               "copy_gbs": copy_bandwidth_gbs() if torch.cuda.is_available() else float("nan"),
               "offline": [], "latency": [], "hf": [], "online": [], "grid": [], "serve_check": [],
               "vs": [], "vs_latency": [], "vs_online": [], "done": []}
    if args.compare == "vllm":
        from bench_serve_vllm import probe
        version, reason = probe(args.vllm_python, args.vllm_path)
        results["peer"] = {"name": "vllm", "version": version, "reason": reason}
        print(f"vLLM {version}" if version else f"vLLM not run: {reason}", flush=True)
    return results


def plan(args, models: list[str]) -> list:
    peer = importlib.import_module("bench_serve_peer") if args.compare == "vllm" or args.workload else None
    steps = []
    first = models[0]
    if args.mode in ("offline", "suite"):
        steps.append((f"offline {first}", lambda r, p: bench_model(args, first, r, p)))
        if args.compare == "vllm":
            steps.append((f"vllm offline {first}", lambda r, p: peer.bench_vllm_main(args, first, r, p)))
        if args.slim:
            steps.append((f"slim {first}", lambda r, p: bench_model(args, first, r, p, slim=args.slim)))
    steps += grid_steps(args, first)
    if args.mode in ("offline", "suite") and args.compare == "hf":
        steps.append((f"hf {first}", lambda r, p: bench_hf(args, first, r, p)))
    if args.mode in ("online", "suite"):
        for rate in args.rate:
            steps.append((f"online {first} at {rate}", lambda r, p, q=rate: bench_online(args, first, r, p, q)))
            if args.compare == "vllm":
                steps.append((f"vllm online {first} at {rate}",
                              lambda r, p, q=rate: peer.bench_vllm_online(args, first, r, p, q)))
    if args.mode in ("offline", "suite"):
        for name in models[1:]:
            steps.append((f"offline {name}", lambda r, p, n=name: bench_model(args, n, r, p)))
    for w in args.workload:
        steps.append((f"workload {w['label']}", lambda r, p, w=w: peer.bench_workload(args, w, r)))
    return steps


def main_workload(args, name: str) -> str:
    return f"{name}, {args.num_requests} x {args.min_prompt}-{args.max_prompt} -> {args.output_len}, len {args.max_model_len}"


def grid_steps(args, name: str) -> list:
    """Parent and slimmed sibling on every mix at every grid length (not the main run's mix and length
    again); then, with --serve-check, `compress serve` of the sibling at each grid length."""
    if not args.slim or not (args.mix or args.grid_max_model_len):
        return []
    mixes = [(args.min_prompt, args.max_prompt, args.output_len)] + args.mix
    steps = []
    for length in args.grid_max_model_len or [args.max_model_len]:
        for mix in mixes:
            if (mix, length) != (mixes[0], args.max_model_len) and mix[1] + mix[2] <= length:
                steps.append((f"grid {name} {mix} at {length}",
                              lambda r, p, m=mix, n=length: bench_pair(args, name, r, m, n)))
    if args.serve_check:
        steps += [(f"serve {name} slimmed at {n}", lambda r, p, n=n: serve_check(args, name, r, n))
                  for n in args.grid_max_model_len or [args.max_model_len]]
    return steps


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["offline", "online", "suite"])
    p.add_argument("--model", action="append", help="shape name or model directory (repeatable)")
    add_workload_args(p)
    p.add_argument("--compare", choices=["hf", "vllm"], default=None,
                   help="also run Hugging Face baselines, or vLLM on the same checkpoints (evals/bench_serve_vllm.py)")
    p.add_argument("--vllm-path", default=None, help="a folder to put first on vLLM's PYTHONPATH (evals/peers/install.py)")
    p.add_argument("--vllm-python", default=sys.executable, help="the interpreter that runs vLLM")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=None,
                   help="vLLM's share of GPU memory (default: vLLM's own, 0.9 of the whole GPU)")
    p.add_argument("--vllm-startup-s", type=float, default=900, help="how long vLLM's server may take to answer /health")
    p.add_argument("--workload", type=parse_workload, action="append", default=[],
                   metavar="MODEL:MIN:MAX:OUT:MAX_MODEL_LEN[:NUM]",
                   help="another offline workload for the runtime (and vLLM with --compare vllm), e.g. "
                        "gemma-3-4b:8192:16384:256:16640:64")
    p.add_argument("--hf-requests", type=int, default=None, help="HF runs on the first N prompts (default all)")
    p.add_argument("--slim", type=float, default=None, help="also time a slimmed sibling at this FLOPs ratio")
    p.add_argument("--rate", type=float, action="append", default=None,
                   help="online: Poisson arrival rate (requests/s); repeat for several (default 8)")
    p.add_argument("--online-requests", type=int, default=128)
    p.add_argument("--kv-cache-memory", default=None, help="as `compress serve --kv-cache-memory` (0.9, 40GB)")
    p.add_argument("--mix", type=parse_mix, action="append", default=[], metavar="MIN:MAX:OUT",
                   help="grid: another workload (prompt lengths MIN..MAX, OUT output tokens), e.g. 32:1800:384")
    p.add_argument("--grid-max-model-len", type=int, action="append", default=[], metavar="N",
                   help="grid: a context length at which the parent and its --slim sibling run every mix")
    p.add_argument("--serve-check", action="store_true",
                   help="grid: start `compress serve` of the slimmed sibling at each grid length")
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--resume", action="store_true",
                   help="continue the run recorded in --out's JSON: steps already done are skipped")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no step after this many seconds, past the first (--resume goes on from there)")
    args = p.parse_args(argv)
    args.hf_requests = args.hf_requests or args.num_requests
    args.rate = args.rate or [8.0]
    return args


if __name__ == "__main__":
    sys.exit(main())

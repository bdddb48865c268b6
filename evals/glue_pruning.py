"""Regenerate evals/results/glue_pruning.{md,json,png}: dense vs pruned GLUE dev metrics, baselines, speed.

For each model and task: fine-tune the dense model (or reuse it), then prune it at each FLOPs
target with the paper's method (fisher) and the two baselines (magnitude, random; same FLOPs, same
slimming; variants of the Fisher method such as fisher-model or fisher-iter4 can run beside them,
see --methods), evaluate every model on the dev split, and time each slimmed model against its dense
parent at batch 32 and batch 1, sequence length 128 (CUDA events with bf16 autocast on GPU,
perf_counter in fp32 on CPU). Resumable: every finished step is kept in `--work` (models) and in
`--work/state.json` (numbers); rerun the same command to continue.

The command that produced the committed table (on the GPU machine, ../shared/data beside the repo):
    python evals/glue_pruning.py --models minilm mpnet-base --tasks sst2 mrpc stsb rte \
        --data-dir ../shared/data --work runs/glue_pruning
Smoke test on CPU:  python evals/glue_pruning.py --models minilm --tasks rte --flops 0.5 \
        --methods fisher --finetune-steps 20 --num-samples 64 --data-dir ../shared/data --work /tmp/gp
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None):
    from compress.pruning.config import FISHERS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["minilm", "mpnet-base"])
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "stsb", "rte"])
    p.add_argument("--flops", nargs="+", type=float, default=[0.4, 0.5, 0.6, 0.7])
    p.add_argument("--methods", nargs="+", default=["fisher", "magnitude", "random"],
                   help="fisher, magnitude, random; fisher-empirical / fisher-model: the Fisher method with that "
                        "Fisher, to compare the two in one run (fisher alone uses --fisher); fisher-iterK (e.g. "
                        "fisher-iter4): the empirical Fisher with K search steps (compress prune --search-steps), "
                        "fisher-model-iterK the same with the model Fisher; fisher-speedupS (e.g. fisher-speedup1.6): "
                        "the Fisher method under the FLOPs target and a latency budget of the dense time / S, both "
                        "from --latency-table (compress prune --flops F --speedup S; fisher-speedupS-free adds "
                        "--no-keep-last-head); a trailing -weights or -masks "
                        "(fisher-masks, fisher-iter4-weights) picks what is tuned (compress prune --[no-]tune-weights)")
    p.add_argument("--fisher", choices=FISHERS, default=None,
                   help="the Fisher of the 'fisher' method (default: compress prune's default)")
    p.add_argument("--latency-table", default=None,
                   help="`compress latency-table` JSON for the fisher-speedupS methods (measured where the models run)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--work", default="runs/glue_pruning", help="models and state.json (resumable)")
    p.add_argument("--out", default=str(RESULTS / "glue_pruning"), help="output path without suffix")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--finetune-steps", type=int, default=None, help="cap fine-tuning steps (smoke tests)")
    p.add_argument("--num-samples", type=int, default=2048)
    p.add_argument("--latency-devices", nargs="+", default=None, help="default: cuda and cpu if cuda, else cpu")
    p.add_argument("--latency-reps", type=int, default=20)
    p.add_argument("--latency-seq", type=int, default=128)
    p.add_argument("--report-only", action="store_true",
                   help="tabulate the numbers saved in --work/state.json, compute nothing (e.g. after a GPU run)")
    return p.parse_args(argv)


class State:
    """Numbers computed so far, saved after every step so that a rerun skips them."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1))
        return value


def dense_model(args, state, model, task, work):
    from compress.train.config import FinetuneConfig
    from compress.train.finetune import finetune

    out = work / f"{Path(model).name}-{task}" / "dense"
    if not (out / "model.safetensors").is_file():
        finetune(FinetuneConfig(model=model, task=task, output=str(out), epochs=args.epochs,
                                max_steps=args.finetune_steps, learning_rate=args.learning_rate,
                                data_dir=args.data_dir, overwrite=True))
    return out


def pruned_model(args, state, dense, task, method, flops):
    from compress.pruning.config import PruneConfig
    from compress.pruning.pipeline import prune

    out = dense.parent / f"{method}-{flops:g}"
    key = f"{out}:prune"
    if state.get(key) is None or not (out / "model.safetensors").is_file():
        settings = method_settings(method, args.fisher)
        if "speedup" in settings:
            if not args.latency_table:
                raise SystemExit(f"--methods {method} needs --latency-table")
            settings["latency_table"] = args.latency_table
        config = PruneConfig(model=str(dense), task=task, output=str(out), flops=flops, num_samples=args.num_samples,
                             data_dir=args.data_dir, overwrite=True, **settings)
        record = prune(config)
        state.put(key, {"seconds": record["seconds"], "flops_ratio": record["flops_ratio"], "fisher": config.fisher,
                        "search_steps": config.search_steps, "tune_weights": config.tune_weights,
                        "heads": record["num_attention_heads_per_layer"],
                        "filters": record["intermediate_size_per_layer"],
                        **({"steps": record["steps"]} if "steps" in record else {}),
                        **({"latency": {k: v for k, v in record["latency"].items() if k != "latency_table"}}
                           if "latency" in record else {})})
    return out


def method_settings(method: str, fisher: str | None) -> dict:
    """PruneConfig fields of a --methods name: `fisher` (its Fisher from --fisher), `fisher-empirical`,
    `fisher-model`, `fisher-iterK` (empirical, K search steps), `fisher-model-iterK`, `fisher-speedupS`
    (a latency budget of the dense time / S beside the FLOPs target; `fisher-speedupS-free` without
    `--keep-last-head`), the baselines; a trailing `-weights`
    or `-masks` (e.g. `fisher-masks`, `fisher-iter4-weights`) says what is tuned (compress prune's
    default, without it: the weights)."""
    base, *parts = method.split("-")
    settings = {"method": base}
    if parts and parts[0].startswith("speedup"):
        settings["speedup"] = float(parts.pop(0)[len("speedup"):])
        if parts and parts[0] == "free":
            parts.pop(0)
            settings["keep_last_head"] = False
    if parts and parts[-1] in ("weights", "masks"):
        settings["tune_weights"] = parts.pop() == "weights"
    if parts and parts[-1].startswith("iter") and parts[-1][4:].isdigit():
        settings["search_steps"] = int(parts.pop()[4:])
        parts = parts or ["empirical"]  # a named variant says its Fisher; --fisher is the bare column's
    if parts or fisher:
        settings["fisher"] = "-".join(parts) or fisher
    return settings


def dev_metrics(args, state, path, task):
    from compress.models import checkpoint
    from compress.train.evaluate import evaluate
    from compress.data.tasks import get_task

    key = f"{path}:eval"
    if state.get(key) is None and not args.report_only:
        model = checkpoint.load(path)
        state.put(key, evaluate(model, checkpoint.load_tokenizer(path), get_task(task), args.data_dir, progress=False))
    return state.get(key)


def latency_ms(args, state, path, device, batch):
    """Mean milliseconds of `latency_reps` forwards (after warm-up) at [batch, latency_seq]."""
    import torch

    from compress.models import checkpoint
    from compress.pruning.cost import _timer
    from compress.device import autocast

    key = f"{path}:latency:{device}:{batch}"
    if state.get(key) is None and not args.report_only:
        dev = torch.device(device)
        model = checkpoint.load(path, device=dev)
        ids = torch.randint(0, model.config.vocab_size, (batch, args.latency_seq), device=dev)
        with torch.inference_mode(), autocast(dev):
            for _ in range(3):
                model(input_ids=ids)
            state.put(key, _timer(dev)(lambda: model(input_ids=ids), args.latency_reps))
    return state.get(key)


def _done(state, path, devices) -> bool:
    """Whether every number of `path` is saved: a fresh machine then needs none of its files."""
    keys = [f"{path}:eval"] + [f"{path}:latency:{d}:{b}" for d in devices for b in (32, 1)]
    return all(state.get(k) is not None for k in keys)


def _latencies(args, state, path, devices):
    return {f"{d}:b{b}": latency_ms(args, state, path, d, b) for d in devices for b in (32, 1)}


def run(args) -> dict:
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    state = State(work / "state.json")
    devices = args.latency_devices or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for model in args.models:
        for task in args.tasks:
            t0 = time.perf_counter()
            dense = work / f"{Path(model).name}-{task}" / "dense"
            pruned = {(f, m): dense.parent / f"{m}-{f:g}" for f in args.flops for m in args.methods}
            finished = all(_done(state, p, devices) and state.get(f"{p}:prune") for p in [dense, *pruned.values()])
            if not (finished or args.report_only):
                dense_model(args, state, model, task, work)
            if dev_metrics(args, state, dense, task) is None:  # --report-only and not run yet
                continue
            base = {"model": model, "task": task, "dense": dev_metrics(args, state, dense, task),
                    "dense_latency": _latencies(args, state, dense, devices)}
            for (flops, method), path in pruned.items():
                if not (_done(state, path, devices) and state.get(f"{path}:prune") or args.report_only):
                    pruned_model(args, state, dense, task, method, flops)
                lat = _latencies(args, state, path, devices)
                if dev_metrics(args, state, path, task) is None:
                    continue
                rows.append(dict(base, method=method, flops=flops, metrics=dev_metrics(args, state, path, task),
                                 prune=state.get(f"{path}:prune"),
                                 speedup={k: base["dense_latency"][k] / v for k, v in lat.items()
                                          if v and base["dense_latency"][k]}))
            print(f"{model} {task}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    names = state.get("devices") or {}
    if not args.report_only:
        names = state.put("devices", {**names, **_device_names(devices)})
    return {"command": " ".join(["python", "evals/glue_pruning.py"] + sys.argv[1:]), "devices": names,
            "latency_seq": args.latency_seq, "rows": rows}


def _device_names(devices):
    import platform

    import torch

    names = {}
    for d in devices:
        names[d] = torch.cuda.get_device_name() if d == "cuda" else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    return names


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from glue_pruning_report import write_report

    args = parse_args()
    write_report(run(args), Path(args.out))

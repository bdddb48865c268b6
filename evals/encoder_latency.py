"""Launch-free latency of slimmed encoders, timed on random-weight models of the pruned shapes (issue #2).

Latency depends on shapes alone, so the models pruned by evals/glue_pruning.py need not exist: its
state file records the kept heads and FFN filters per layer of every pruned variant
(`.../<model>-<task>/<method>-<flops>:prune` -> {"heads": [L], "filters": [L]}). Per model, the dense
parent is built from its config with random weights (`num_labels` 2), and each variant is a copy of
it slimmed by the project's own adapter and `compress.pruning.slim.slim_model`, keeping the first k heads and
filters of each layer, so uneven and 0-unit layers are the modules `compress prune` writes. One
forward of `input_ids [batch, seq]` (no padding, hence no attention mask) is timed:

- cuda: bf16 weights (`--cuda-dtype float16|float32` for others; fp32 without TF32, torch's default);
  the forward is captured once in a CUDA graph and replayed, because eager
  MiniLM/MPNet at this size are bound by kernel launches and Python, not by the GPU work. After
  warm-up, `trials` timings of `replays` back-to-back replays each (CUDA events); the median
  per-forward ms, with min and max. If capture fails, the eager forward is timed the same way and
  the timing records `mode: eager` and why.
- cpu: fp32, perf_counter, median of `runs` forwards after warm-up, torch's own thread count.

Shapes shared by several variants (the uniform baselines repeat across tasks) are timed once.
OUT.json is resumable: a shape already timed on a device is skipped. OUT.md holds the table.

On the GPU machine (MiniLM and MPNet, all 96 variants: 47 distinct shapes, cuda and cpu):
    PYTHONPATH=$PWD COMPRESS_CACHE=/tmp/cache HF_HUB_OFFLINE=1 python evals/encoder_latency.py \
        --state evals/results/glue_pruning_state.json --devices cuda cpu --out evals/results/encoder_latency
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

if not __package__:  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from compress.errors import UserError, exit_code  # noqa: E402
from compress.pruning.latency import DTYPES as CUDA_DTYPES  # noqa: E402,F401  (encoder_profile reads it here)
from compress.pruning.latency import dense_model, input_ids, slimmed_copy, time_cpu, time_model  # noqa: E402,F401

RESULTS = Path(__file__).parent / "results"
ENV = "PYTHONPATH=$PWD COMPRESS_CACHE=/tmp/cache HF_HUB_OFFLINE=1"
METHOD = ("cuda: {cuda_dtype} weights (bfloat16 unless --cuda-dtype), the forward captured once in a CUDA graph (attention mask None, no padding); "
          "median per-forward ms over {trials} timings of {replays} back-to-back replays each (CUDA events), "
          "after {warmup} warm-up replays. cpu: fp32, median of {cpu_runs} perf_counter forwards after warm-up, "
          "torch's default thread count. input_ids [batch, {seq}]. FFN widths padded with zero filters to a multiple "
          "of {filter_multiple}, as `compress prune` writes them (same outputs). The fast path `compress.load` installs "
          "(cuda: residual add + LayerNorm as one Triton kernel, Q/K/V as one GEMM, in 16-bit dtypes an FFN of at most "
          "{narrow_ffn} filters with its add + LayerNorm as one Triton kernel, MPNet attention through SDPA "
          "with the relative bias; cpu: the unfused Hugging Face ops) in dense and slimmed models alike.")

# Shape fields of the offline models' config.json, for machines without their weight packages (the
# GPU machine has none); latency needs nothing else. tests/test_encoder_latency.py checks them
# against the converted config.json where one is cached.
KNOWN_BASES = {
    "minilm": dict(model_type="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536, vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
                   hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0),
    "mpnet-base": dict(model_type="mpnet", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, vocab_size=30527, max_position_embeddings=514,
                       relative_attention_num_buckets=32, hidden_act="gelu", layer_norm_eps=1e-5, pad_token_id=1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state", default=str(RESULTS / "glue_pruning_state.json"), help="glue_pruning state.json")
    p.add_argument("--devices", nargs="+", default=None, help="default: cuda and cpu if cuda, else cpu")
    p.add_argument("--out", default=str(RESULTS / "encoder_latency"), help="output path without suffix")
    p.add_argument("--models", nargs="+", default=None, help="only these models (default: all in the state)")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (fisher, magnitude, random)")
    add_timing_args(p, trials=20)
    p.add_argument("--cpu-runs", type=int, default=7, help="cpu: timed forwards per shape and batch")
    p.add_argument("--narrow-ffn-max", type=int, default=None,
                   help="A/B: FFN widths up to this run as one kernel (compress.arch.fast_path.NARROW_FFN_MAX_FILTERS; "
                        "0 turns the fusion off)")
    return p.parse_args(argv)


def add_timing_args(p: argparse.ArgumentParser, trials: int) -> None:
    """The shape and CUDA timing flags `time_shape` reads, shared with evals/lab/encoder_profile.py."""
    p.add_argument("--filter-multiple", type=int, default=8,
                   help="pad FFN widths with zero filters to this multiple, as `compress prune` does (1: none)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", nargs="+", type=int, default=[32, 1])
    p.add_argument("--trials", type=int, default=trials, help="cuda: timings per shape and batch")
    p.add_argument("--replays", type=int, default=20, help="cuda: graph replays per timing")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cuda-dtype", choices=sorted(CUDA_DTYPES), default="bfloat16",
                   help="cuda: weights and activations in this dtype (float32: no TF32, as torch defaults)")


# --- what to time ---------------------------------------------------------------------------------
def read_variants(state_path, models=None, methods=None) -> list[dict]:
    """Pruned variants in a glue_pruning state file: model, task, method, flops and kept shapes."""
    path = Path(state_path)
    if not path.is_file():
        raise UserError(f"state file {path} not found (evals/results/glue_pruning_state.json is the committed one)")
    state = json.loads(path.read_text())
    variants = [_variant(key, value, models) for key, value in state.items() if key.endswith(":prune")]
    variants = [v for v in variants if (not models or v["model"] in models) and (not methods or v["method"] in methods)]
    if not variants:
        raise UserError(f"no pruned variants in {path} match --models {models} --methods {methods}")
    return sorted(variants, key=lambda v: (v["model"], v["task"], v["flops"], v["method"]))


def _variant(key: str, value: dict, models) -> dict:
    run = Path(key[: -len(":prune")])
    model, task = _split_model_task(run.parent.name, models)
    method, flops = run.name.rsplit("-", 1)
    return dict(model=model, task=task, method=method, flops=float(flops), flops_ratio=value.get("flops_ratio"),
                heads=list(value["heads"]), filters=list(value["filters"]))


def _split_model_task(name: str, models) -> tuple[str, str]:
    """`mpnet-base-sst2` -> (`mpnet-base`, `sst2`); known model names first, since tasks may hold '-'."""
    from compress.models.hub import known_names

    for model in sorted({*(models or []), *known_names()}, key=len, reverse=True):
        if name.startswith(model + "-"):
            return model, name[len(model) + 1:]
    return tuple(name.rsplit("-", 1))  # type: ignore[return-value]


def shape_key(model: str, heads=None, filters=None) -> str:
    if heads is None:
        return f"{model}:dense"
    return f"{model}:h{'.'.join(map(str, heads))}:f{'.'.join(map(str, filters))}"


# --- models ---------------------------------------------------------------------------------------
def base_config(name: str):
    """The config of model `name` (num_labels 2) and where it came from: compress.models.hub, else KNOWN_BASES."""
    from transformers import AutoConfig

    from compress.models.hub import resolve_model

    try:
        path = resolve_model(name)
        return AutoConfig.from_pretrained(path, num_labels=2), str(path)
    except UserError as err:
        if name not in KNOWN_BASES:
            raise
        fields = dict(KNOWN_BASES[name])
        config = AutoConfig.for_model(fields.pop("model_type"), num_labels=2, **fields)
        return config, f"shape fields in evals/encoder_latency.py (compress.models.hub: {err})"


# --- timers ---------------------------------------------------------------------------------------
def time_shape(model, device: str, args) -> dict:
    """{"b32": timing, "b1": timing} of `model` on `device` (moved there in --cuda-dtype, and back, for cuda)."""
    runs = args.cpu_runs if device == "cpu" else args.trials
    return time_model(model, device, args.batches, args.seq, args.cuda_dtype, runs, args.replays, args.warmup)


# --- results --------------------------------------------------------------------------------------
def describe_devices(devices, args) -> dict:
    import platform

    out = {}
    for d in devices:
        if d == "cuda":
            out[d] = dict(name=torch.cuda.get_device_name(), dtype=args.cuda_dtype, torch=torch.__version__,
                          timing=f"CUDA graph replays; median of {args.trials} timings of {args.replays} replays")
        else:
            out[d] = dict(name=f"{_cpu_model() or platform.machine()}, {os.cpu_count()} cores",
                          threads=torch.get_num_threads(), dtype="float32", torch=torch.__version__,
                          timing=f"perf_counter; median of {args.cpu_runs} forwards")
    return out


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def load_result(path: Path, devices: dict, args) -> dict:
    """OUT.json so far (resume), checked to have been timed on the same devices and sequence length."""
    result = json.loads(path.read_text()) if path.is_file() else {}
    for d, desc in devices.items():
        old = result.get("devices", {}).get(d, {}).get("name")
        old_dtype = result.get("devices", {}).get(d, {}).get("dtype")
        if old and old != desc["name"] and result.get("timings", {}).get(d):
            raise UserError(f"{path} holds {d} timings from {old}, not {desc['name']}: use another --out")
        if old_dtype and old_dtype != desc["dtype"] and result.get("timings", {}).get(d):
            raise UserError(f"{path} holds {d} timings in {old_dtype}, not {desc['dtype']}: use another --out")
    if result.get("seq", args.seq) != args.seq:
        raise UserError(f"{path} was timed at sequence length {result['seq']}, not {args.seq}: use another --out")
    result.update(seq=args.seq, batches=sorted(set(result.get("batches", [])) | set(args.batches), reverse=True))
    result["devices"] = {**result.get("devices", {}), **devices}
    result.setdefault("timings", {}), result.setdefault("bases", {})
    return result


def save_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)  # a killed run leaves the previous file whole


def distinct_shapes(variants: list[dict]) -> dict:
    """shape key -> (model, heads, filters): each model's dense parent (None, None), then each pruned shape once."""
    shapes = {shape_key(m): (m, None, None) for m in dict.fromkeys(v["model"] for v in variants)}
    for v in variants:
        shapes[shape_key(v["model"], v["heads"], v["filters"])] = (v["model"], v["heads"], v["filters"])
    return shapes


def pending(result: dict, shapes: dict, devices, batches) -> dict:
    """shape key -> the devices on which it still lacks a timing for some batch."""
    todo = {}
    for key in shapes:
        missing = [d for d in devices if any(f"b{b}" not in result["timings"].get(d, {}).get(key, {}) for b in batches)]
        if missing:
            todo[key] = sorted(missing, key=lambda d: d != "cpu")  # cpu first: cuda moves the model
    return todo


def entries(result: dict, variants: list[dict]) -> list[dict]:
    """Every variant timed so far (earlier runs' too), with ms and speedup per `device:bBATCH`."""
    rows = {_entry_id(e): e for e in result.get("entries", [])}
    for v in variants:
        rows[_entry_id(v)] = dict(v, shape=shape_key(v["model"], v["heads"], v["filters"]))
    for row in rows.values():
        row["ms"], row["speedup"] = _speeds(result, row["shape"], shape_key(row["model"]))
    return sorted(rows.values(), key=lambda e: (e["model"], e["task"], e["flops"], e["method"]))


def _entry_id(e: dict) -> str:
    return f"{e['model']}/{e['task']}/{e['method']}/{e['flops']:g}"


def _speeds(result: dict, key: str, dense_key: str) -> tuple[dict, dict]:
    ms, speedup = {}, {}
    for device, timings in result["timings"].items():
        for b in result["batches"]:
            t, d = timings.get(key, {}).get(f"b{b}"), timings.get(dense_key, {}).get(f"b{b}")
            if t:
                ms[f"{device}:b{b}"] = t["ms"]
            if t and d:
                speedup[f"{device}:b{b}"] = d["ms"] / t["ms"]
    return ms, speedup


def run(args) -> dict:
    from tqdm.auto import tqdm

    from compress.arch import fast_path, get_adapter

    if args.narrow_ffn_max is not None:
        fast_path.NARROW_FFN_MAX_FILTERS = args.narrow_ffn_max
    devices = args.devices or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    if set(devices) - {"cuda", "cpu"} or ("cuda" in devices and not torch.cuda.is_available()):
        raise UserError(f"--devices {' '.join(devices)}: use cpu, and cuda only where a GPU is visible")
    variants = read_variants(args.state, args.models, args.methods)
    out = Path(args.out).with_suffix(".json")
    result = load_result(out, describe_devices(devices, args), args)
    this = " ".join(["python", "evals/encoder_latency.py"] + sys.argv[1:])
    result["commands"] = [c for c in result.get("commands", []) if c != this] + [this]  # a resumed file: all, in order
    result.update(command=" && ".join(result["commands"]), env=ENV, method=METHOD.format(**vars(args),
                                                                                narrow_ffn=fast_path.NARROW_FFN_MAX_FILTERS))
    shapes = distinct_shapes(variants)
    todo, dense = pending(result, shapes, devices, args.batches), {}
    t0 = time.perf_counter()
    for key in (bar := tqdm(todo, desc="timing shapes", unit="shape")):
        name, heads, filters = shapes[key]
        bar.set_postfix_str(f"{name} on {'+'.join(todo[key])}")
        if name not in dense:
            config, source = base_config(name)
            dense[name] = dense_model(config)
            adapter = get_adapter(dense[name])
            result["bases"][name] = dict(source=source, heads=adapter.num_heads(), filters=adapter.num_filters(),
                                         config=config.to_diff_dict())
        model = copy.deepcopy(dense[name]) if heads is None else slimmed_copy(dense[name], heads, filters,
                                                                                   args.filter_multiple)
        for device in todo[key]:
            result["timings"].setdefault(device, {}).setdefault(key, {}).update(time_shape(model, device, args))
        save_result(out, result)
    result["entries"] = entries(result, variants)
    result["dense"] = {name: _speeds(result, shape_key(name), shape_key(name))[0] for name in result["bases"]}
    save_result(out, result)
    print(f"timed {len(todo)} shapes in {time.perf_counter() - t0:.0f} s ({len(shapes) - len(todo)} already in {out})")
    return result


# --- command line ---------------------------------------------------------------------------------
def write_outputs(result: dict, out: Path) -> None:
    from evals.glue_pruning_report import latency_markdown

    md = latency_markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_code("encoder_latency", lambda: write_outputs(run(args), Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())

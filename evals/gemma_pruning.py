"""Gemma decoder pruning results: perplexity of dense vs pruned at several FLOPs, three criteria, one run.

For each FLOPs fraction (of the non-embedding FLOPs at --context-len) and each method (Fisher with
rearrangement and tuning; magnitude and activation-norm baselines with the same GQA search, tuning
and slimming), prune a fresh copy of the dense model, then measure perplexity on held-out Wikipedia
(the articles calibration did not use) and on a held-out novel, time every phase, and record greedy
continuations of fixed prompts. Calibration windows and each method's scores are computed once and
shared by all FLOPs levels (their time is reported once). Writes `<out>.md` and `<out>.json`.

GPU (the reported run):
  python -m evals.gemma_pruning --model gemma-3-270m --data-dir ../shared/data
CPU check (small, minutes):
  python -m evals.gemma_pruning --quick --data-dir ../shared/data --out /tmp/gemma_quick
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as a file (`python evals/gemma_pruning.py`): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.arch import get_adapter  # noqa: E402

PROMPTS = ("The history of the city begins", "It is a truth universally acknowledged that",
           "The river flows north through")
NOVEL = "austen/persuasion.txt.gz"  # not used for calibration (that is Wikipedia's head)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--data-dir", default=None, help="shared data dir with text/ (default $COMPRESS_DATA_DIR)")
    p.add_argument("--flops", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6])
    p.add_argument("--methods", nargs="+", default=["fisher", "magnitude", "activation", "activation-mlp"])
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--context-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ppl-seq-len", type=int, default=512)
    p.add_argument("--ppl-max-windows", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="evals/results/gemma_pruning")
    p.add_argument("--tune-weights", action="store_true", help="tune the output projections' kept columns")
    p.add_argument("--quick", action="store_true", help="tiny CPU configuration to validate the script")
    p.add_argument("--cpu-table", action="store_true", help="the reduced configuration of the committed CPU table")
    args = p.parse_args(argv)
    if args.quick:
        args.flops, args.num_samples, args.seq_len, args.batch_size = [0.8], 8, 128, 4
        args.ppl_seq_len, args.ppl_max_windows, args.max_new_tokens = 128, 8, 12
    if args.cpu_table:
        args.num_samples, args.seq_len, args.batch_size = 32, 96, 8
        args.ppl_seq_len, args.ppl_max_windows, args.max_new_tokens = 256, 8, 16
    return args


def decoder_base(args, **fields):
    """(the shared data directory, the base PruneConfig of a decoder evaluation: `args`' model, calibration
    and device, at FLOPs 1.0); exits in one line without the shared text."""
    from compress.data.calib import wikipedia_path
    from compress.pruning.config import PruneConfig

    wiki = wikipedia_path(args.data_dir)
    if wiki is None:
        sys.exit("needs the shared text data: pass --data-dir DIR or set COMPRESS_DATA_DIR")
    data_dir = wiki.parents[1]
    return data_dir, PruneConfig(model=args.model, output="-", flops=1.0, data_dir=str(data_dir),
                                 num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                                 device=args.device, family="decoder", **fields)


def decoder_distill_config(args, data_dir: Path, tokens: int):
    """The DistillConfig of a decoder evaluation's distillation runs (`args`' window, batch, lr and device;
    no held-out evaluation during training: the evaluation measures afterwards)."""
    from compress.distill.config import DistillConfig

    return DistillConfig(student="-", teacher="-", output="-", tokens=tokens, data_dir=str(data_dir),
                         seq_len=args.distill_seq_len, batch_size=args.distill_batch_size, lr=args.lr,
                         eval_every=10 ** 9, device=args.device).validate()


def heldout_sets(tokenizer, data_dir: Path, args) -> dict:
    from compress.data.calib import CALIB_FRACTION, bos_token_id
    from compress.data.perplexity import heldout_ids, make_windows

    bos = bos_token_id(tokenizer)
    wiki = heldout_ids(tokenizer, data_dir / "text" / "wikipedia_sample.txt.gz", tail=1 - CALIB_FRACTION)
    novel = heldout_ids(tokenizer, data_dir / "text" / NOVEL)
    return {name: make_windows(ids, bos, args.ppl_seq_len, args.ppl_max_windows)
            for name, ids in (("wikipedia (held-out articles)", wiki), (f"novel ({Path(NOVEL).name.split('.')[0]})", novel))}


def evaluate(model, tokenizer, sets, args) -> dict:
    from compress.data.perplexity import perplexity

    return {"perplexity": {name: round(perplexity(model, w, args.batch_size)["perplexity"], 3)
                           for name, w in sets.items()},
            "continuations": continuations(model, tokenizer, args.max_new_tokens)}


def continuations(model, tokenizer, max_new_tokens: int) -> list[str]:
    """Greedy continuations of `PROMPTS`."""
    device, texts = next(model.parameters()).device, []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def run(args) -> dict:
    from compress.data.calib import wikipedia_path
    from compress.pruning.config import PruneConfig
    from compress.pruning.pipeline import Pipeline

    wiki = wikipedia_path(args.data_dir)
    if wiki is None:
        sys.exit("needs the shared text data: pass --data-dir DIR or set COMPRESS_DATA_DIR")
    data_dir = wiki.parents[1]
    base = PruneConfig(model=args.model, output="-", flops=1.0, data_dir=str(data_dir), num_samples=args.num_samples,
                       seq_len=args.seq_len, context_len=args.context_len, batch_size=args.batch_size,
                       tune_weights=args.tune_weights, device=args.device, family="decoder")
    shared = Pipeline(base)
    with shared.phases("load"):
        dense, tokenizer, _ = shared.family.load(shared.config, shared.device)
    with shared.phases("calibration"):
        calib = shared.family.calibrate(shared.config, dense, tokenizer, True)
    sets = heldout_sets(tokenizer, data_dir, args)
    with shared.phases("eval_dense"):
        rows = [{"method": "dense", "flops": 1.0, **evaluate(dense, tokenizer, sets, args)}]
    scores = {}
    for method in args.methods:  # one scoring per criterion, shared by every budget
        scorer = Pipeline(dataclasses.replace(base, method=method))
        with shared.phases(method):
            scores[method] = scorer.family.score(scorer.config, dense, get_adapter(dense), calib, shared.device,
                                                 None, True, {})
    result = {"rows": rows, "shared_seconds": shared.phases.seconds, "calibration": calib.source,
              "settings": vars(args), "device": device_name(dense), "command": command_line()}
    for flops in args.flops:
        for method in args.methods:
            config = dataclasses.replace(base, method=method, flops=flops)
            rows.append(prune_one(dense, tokenizer, calib, scores[method], config, method, flops, sets, args))
            print(json.dumps({k: rows[-1][k] for k in ("method", "flops", "perplexity")}), flush=True)
            write_results(result, Path(args.out))  # after every row: a long CPU run keeps what it finished
    return result


def prune_one(dense, tokenizer, calib, scores, config, method, flops, sets, args) -> dict:
    """The pipeline's stages after scoring (search, rearrange, tune, slim) on a copy of the dense model."""
    from compress.pruning.pipeline import Pipeline
    from compress.pruning.slim import slim_model
    from compress.pruning.summary import shape_record

    model, pipe = copy.deepcopy(dense), Pipeline(config)
    adapter = get_adapter(model)
    parent = pipe.family.parent_shape(adapter)
    cost_model = pipe.family.cost_model(adapter, calib, pipe.config)
    heads, filters = pipe.masks(model, adapter, calib, cost_model, parent, scores=scores)
    with pipe.phases("slim"):
        slim_model(adapter, heads, filters)
    shape = shape_record(pipe.config, pipe.family.shape_record(adapter, cost_model, parent, [0] * len(filters)),
                         pipe.phases)
    result = evaluate(model, tokenizer, sets, args)
    keep = ("flops_ratio", "num_attention_heads_per_layer", "num_key_value_heads_per_layer",
            "intermediate_size_per_layer", "seconds")
    del model
    return {"method": method, "flops": flops, **{k: shape[k] for k in keep}, **result}


def device_name(model_or_device) -> str:
    """The GPU's name, or "cpu", of a device or of the device a model's parameters are on."""
    device = model_or_device if isinstance(model_or_device, torch.device) else next(model_or_device.parameters()).device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def command_line() -> str:
    return "python -m evals.gemma_pruning " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def write_markdown(result: dict, path: Path) -> None:
    rows, sets = result["rows"], list(result["rows"][0]["perplexity"])
    s = result["settings"]
    lines = [f"# Gemma pruning: {s['model']}", "", f"Command: `{result['command']}`", "",
             f"Device: {result['device']}. Calibration: {result['calibration']}, {s['num_samples']} windows of "
             f"{s['seq_len']} tokens. FLOPs are of the non-embedding FLOPs at context {s['context_len']} "
             f"(the LM head is not pruned). Perplexity: BOS + {s['ppl_seq_len'] - 1} tokens per window, "
             f"at most {s['ppl_max_windows']} windows per text. Every pruned model: GQA-shaped search, "
             "least-squares tuning, slimming; Fisher also rearranges. Baselines: magnitude = L2 norm of a unit's "
             "weights; activation = Wanda-style |W| x ||X|| summed over a unit's output-projection columns "
             "(FLAP-like structured variant); both rescaled per unit kind (score / kind mean x unit FLOPs) so that one global search "
             "ranks heads against filters; activation-mlp = the same scores, MLP filters only (all heads kept); fisher-mlp (ablation, when "
             "listed) = the Fisher pipeline restricted to MLP filters.", "",
             "| FLOPs | method | " + " | ".join(f"ppl {n}" for n in sets) + " | FLOPs kept | q heads | kv heads | "
             "filters | seconds (search/rearrange/tune/slim) |",
             "|---" * (7 + len(sets)) + "|"]
    for r in rows:
        ppl = " | ".join(f"{r['perplexity'][n]:.2f}" for n in sets)
        if r["method"] == "dense":
            lines.append(f"| 1.0 | dense | {ppl} | 100% | | | | |")
            continue
        sec = r["seconds"]
        secs = "/".join(f"{sec.get(k, 0):.1f}" for k in ("search", "rearrange", "tune", "slim"))
        lines.append(f"| {r['flops']} | {r['method']} | {ppl} | {100 * r['flops_ratio']:.1f}% | "
                     f"{sum(r['num_attention_heads_per_layer'])} | {sum(r['num_key_value_heads_per_layer'])} | "
                     f"{sum(r['intermediate_size_per_layer'])} | {secs} |")
    if "total_seconds" not in result:
        lines += ["", "(run in progress or interrupted: the rows above are those finished)"]
    lines += ["", "Shared phases (once per run, seconds): "
              + ", ".join(f"{k} {v:.1f}" for k, v in result["shared_seconds"].items()), "",
              "## Greedy continuations", ""]
    for i, prompt in enumerate(PROMPTS):
        lines.append(f"**{prompt}**")
        lines.append("")
        for r in rows:
            text = r["continuations"][i].replace("\n", " ").replace("|", "/")
            lines.append(f"- {r['method']} @ {r['flops']}: {text}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(result, Path(args.out))
    print(f"wrote {Path(args.out).with_suffix('.md')} and {Path(args.out).with_suffix('.json')}")
    return 0


def write_results(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out.with_suffix(".md"))


if __name__ == "__main__":
    raise SystemExit(main())

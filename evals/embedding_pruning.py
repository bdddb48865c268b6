"""Label-free pruning of sentence-embedding models: STS-B cosine Spearman (and BBC News nearest-neighbour
accuracy) of the dense model, of `compress prune --objective embedding` at a FLOPs budget and, with
--distill-steps, of the pruned model recovered by `compress distill` from the dense model's embeddings.

Regenerates evals/results/embedding_pruning.md and its JSON twin. Resumable: each model is pruned into
--work only when missing, and each evaluation stored in the JSON is skipped when present.

  python evals/embedding_pruning.py --work /tmp/ep --data-dir ../shared/data --models minilm mpnet-base \
      --flops 0.5 --num-samples 512 [--bbc] [--distill-steps 400 --distill-max-seq-length 64]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "embedding_pruning"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="directory for the pruned models (reused between runs)")
    p.add_argument("--data-dir", required=True, help="holds glue/STS-B (dev: 1,500 pairs) and text/ (calibration)")
    p.add_argument("--models", nargs="+", default=["minilm", "mpnet-base"])
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--num-samples", nargs="+", type=int, default=[512],
                   help="calibration passages, one value or one per model")
    p.add_argument("--calib", default=None, help="calibration text (default: the data directory's Wikipedia head)")
    p.add_argument("--max-seq-length", type=int, default=None, help="calibration passages cut to this many tokens "
                   "(default 128)")
    p.add_argument("--search-steps", type=int, default=1)
    p.add_argument("--distill-steps", type=int, default=None, help="then distil the pruned model this many steps")
    p.add_argument("--distill-batch-size", type=int, default=32)
    p.add_argument("--distill-max-seq-length", type=int, default=128, help="training passages cut to this length")
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--distill-relational", type=float, default=1.0)
    p.add_argument("--bbc", action="store_true", help="also BBC News 1-NN accuracy (minutes per model on a CPU)")
    p.add_argument("--results", default=str(RESULTS))
    return p.parse_args(argv)


def prune(args, model: str, num_samples: int) -> Path:
    import compress

    out = Path(args.work) / f"{model}-emb-{args.flops}-{num_samples}{''.join('-' + p for p in _variant(args)[1:])}"
    if not (out / "prune.json").is_file():
        compress.prune(model, None, out, objective="embedding", flops=args.flops, num_samples=num_samples,
                       calib=args.calib, data_dir=args.data_dir, device="cpu", max_seq_length=args.max_seq_length,
                       search_steps=args.search_steps)
    return out


def distill(args, model: str, pruned: Path) -> tuple[str, Path]:
    """(row label, directory) of the pruned model distilled from `model` as --distill-* say (made when missing)."""
    from compress.distill.embed_config import EmbedDistillConfig
    from compress.distill.embedding import distill_embedding

    defaults = {"batch_size": 32, "max_seq_length": 128, "lr": 1e-4, "relational": 1.0}
    settings = {k: getattr(args, f"distill_{k}") for k in defaults}
    extra = [f"{k.replace('_', '-')} {v}" for k, v in settings.items() if v != defaults[k]]
    label = f"+ distilled {args.distill_steps} steps" + (f" ({', '.join(extra)})" if extra else "")
    out = pruned.with_name(pruned.name + "-distill-" + "-".join([str(args.distill_steps)] + [e.replace(" ", "")
                                                                                           for e in extra]))
    if not (out / "distill.json").is_file():
        distill_embedding(EmbedDistillConfig(student=str(pruned), teacher=model, output=str(out), steps=args.distill_steps,
                                             data_dir=args.data_dir, calib=args.calib, device="cpu", **settings))
    return label, out


def _variant(args, num_samples: int = 512) -> list[str]:
    """What sets a run apart from the defaults: its FLOPs when not 0.5, then any other setting given."""
    return ([f"flops{args.flops}" if args.flops != 0.5 else ""] + ([f"len{args.max_seq_length}"] if args.max_seq_length
            else []) + ([f"steps{args.search_steps}"] if args.search_steps > 1 else [])
            + ([f"n{num_samples}"] if num_samples != 512 else []))


def evaluate(store: dict, key: str, path, args) -> dict:
    from compress.embeddings.evaluate import evaluate_dir

    tasks = ["stsb-embed"] + (["bbc-news-embed"] if args.bbc else [])
    for task in tasks:
        if task not in store.setdefault(key, {}):
            store[key][task] = evaluate_dir(path, task, args.data_dir, "cpu")
            print(key, task, store[key][task], flush=True)
    return store[key]


def render(data: dict) -> str:
    lines = ["# Label-free pruning of sentence-embedding models", "", "Regenerate (in this order):", "",
             *[f"    {c}" for c in data["commands"]], "",
             "STS-B: Spearman (x100) of the cosine similarity of the two sentences' embeddings with the gold "
             "scores, STS-B dev (1,500 pairs), as sentence-transformers' STS benchmark. BBC News: accuracy of "
             "1-nearest-neighbour classification of the 445 dev articles among the 1,780 training articles "
             "(cosine, first 128 tokens). Pruned: `compress prune --objective embedding` (no labels; Fisher of "
             "the distillation loss between the masked and the dense embeddings) on passages of the data "
             "directory's Wikipedia sample; CPU, fp32. Distilled: `compress distill PRUNED --teacher DENSE` (no "
             "labels; the pruned model learns the dense model's normalised embeddings and their in-batch cosine "
             "similarities on fresh passages of the same text, 32 a step unless the row says otherwise, "
             "compress/distill/embedding.py); its "
             "seconds are the distillation's, on top of the pruning's.", "",
             "| model | variant | FLOPs ratio | calibration passages | seconds | STS-B Spearman | change | "
             "BBC News 1-NN | change |", "|---|---|---|---|---|---|---|---|---|"]
    for model, row in data["models"].items():
        dense, pruned = row["dense"], row["pruned"]
        for name, result in (("dense", dense), (f"pruned {row['flops']}", pruned)):
            lines.append(_row(model, name, row, result, dense, name == "dense"))
        for label, result in row.get("distilled", {}).items():
            lines.append(_row(model, f"pruned {row['flops']} {label}", row, result, dense, False, result["seconds"]))
    return "\n".join(lines) + "\n"


def _row(model, name, row, result, dense, is_dense, seconds=None) -> str:
    def metric(task, key):
        if task not in result:
            return "-", "-"
        value, base = result[task][key], dense[task][key]
        return f"{value:.2f}", "" if is_dense else f"{value - base:+.2f}"
    sts, sts_change = metric("stsb-embed", "spearman")
    bbc, bbc_change = metric("bbc-news-embed", "accuracy")
    ratio = "1.000" if is_dense else f"{row['flops_ratio']:.3f}"
    samples = "" if is_dense else str(row["num_samples"])
    seconds = "" if is_dense else f"{row['seconds'] if seconds is None else seconds:.0f}"
    return f"| {model} | {name} | {ratio} | {samples} | {seconds} | {sts} | {sts_change} | {bbc} | {bbc_change} |"


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"models": {}, "commands": []}


def main(argv=None) -> int:
    args = parse_args(argv)
    json_path = Path(args.results).with_suffix(".json")
    data = _read(json_path)
    command = "python evals/embedding_pruning.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    samples = args.num_samples * len(args.models) if len(args.num_samples) == 1 else args.num_samples
    for model, n in zip(args.models, samples):
        out = prune(args, model, n)
        record = json.loads((out / "prune.json").read_text())
        key = " ".join([model] + [p for p in _variant(args, n) if p])
        row = data["models"].setdefault(key, {})
        row.update(flops=args.flops, flops_ratio=record["flops_ratio"], num_samples=n,
                   seconds=record["seconds"]["total"], heads=record["num_attention_heads_per_layer"],
                   filters=record["intermediate_size_per_layer"])
        evaluate(row, "dense", model, args)
        evaluate(row, "pruned", out, args)
        if args.distill_steps:
            label, distilled = distill(args, model, out)
            record = json.loads((distilled / "distill.json").read_text())
            entry = row.setdefault("distilled", {}).setdefault(label, {})
            entry.update(steps=record["steps_done"], seconds=record["seconds"], passages=record["passages"])
            evaluate(row["distilled"], label, distilled, args)
        data = _read(json_path)  # other runs may have written rows meanwhile: add this one to theirs
        data["models"][key] = row
        data["commands"] = [c for c in data.get("commands", []) if c != command] + [command]
        json_path.write_text(json.dumps(data, indent=2) + "\n")
    Path(args.results).with_suffix(".md").write_text(render(data))
    print(f"wrote {Path(args.results).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

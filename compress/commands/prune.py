"""`compress prune`: Fisher post-training pruning of heads and filters into a smaller dense encoder."""

from __future__ import annotations

from compress.commands._common import add_data_flags, overrides

FIELDS = ("model", "task", "output", "flops", "latency_ms", "method", "num_samples", "seed", "max_seq_length",
          "batch_size", "damp", "data_dir", "device", "eval", "overwrite", "rearrange", "tune")


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="prune heads and FFN filters after training (Kwon et al. 2022)",
                              description="Fisher-based post-training pruning: mask search under a FLOPs or "
                                          "latency budget, rearrangement, least-squares mask tuning, slimming.")
    p.add_argument("--model", help="fine-tuned model: local directory, offline name or hub id")
    p.add_argument("--task", help="task the model was fine-tuned on (its train split is the calibration data)")
    p.add_argument("-o", "--output", help="output directory (written atomically)")
    p.add_argument("--flops", type=float, help="fraction of the prunable FLOPs to keep, in (0, 1]")
    p.add_argument("--latency-ms", type=float, help="latency budget in ms on this device at --latency-batch-size")
    p.add_argument("--method", choices=("fisher", "magnitude", "random"), help="mask selection (default fisher)")
    p.add_argument("--num-samples", type=int, help="calibration examples (default: 2048; bbc-news 128)")
    p.add_argument("--seed", type=int, help="seed of the calibration sample (default 0)")
    p.add_argument("--max-seq-length", type=int, help="truncate inputs to this many tokens (default 128)")
    p.add_argument("--batch-size", type=int, help="calibration batch size (default 32)")
    p.add_argument("--damp", type=float, help="damping of the least-squares mask tuning (default 1.0)")
    p.add_argument("--no-rearrange", dest="rearrange", action="store_false", default=None,
                   help="skip the mask rearrangement")
    p.add_argument("--no-tune", dest="tune", action="store_false", default=None, help="skip the mask tuning")
    p.add_argument("--eval", action="store_true", default=None, help="report the dev metric before and after")
    p.add_argument("--recipe", help="YAML file whose keys are these settings; flags override it")
    add_data_flags(p)
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from compress.config import PruneConfig, load_recipe, resolve
    from compress.prune import format_summary, prune

    config = resolve(PruneConfig, load_recipe(args.recipe), **overrides(args, FIELDS))
    record = prune(config)
    print(format_summary(record))
    print(f"  saved to {config.output}")
    return 0

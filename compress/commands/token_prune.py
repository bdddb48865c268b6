"""`compress token-prune`: learned token pruning (Kim et al. 2022) of a fine-tuned or pruned encoder."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "token-prune", help="learn per-layer token-dropping thresholds for an encoder (LTP)",
        description="Learned token pruning: soft stage (thresholds + weights), then hard stage (tokens dropped, "
                    "weights fine-tuned). Works on a fine-tuned encoder or on the output of `compress prune`.")
    p.add_argument("--model", required=True, help="fine-tuned encoder directory or name (or a `compress prune` output)")
    p.add_argument("--task", required=True, help="task name (sst2, mrpc, stsb, rte, ...)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--lambda", dest="mask_lambda", type=float, help="weight of the mean-mask term (default 0.1)")
    p.add_argument("--temperature", type=float, help="soft-mask temperature (default 1e-3)")
    p.add_argument("--final-threshold", type=float, help="initial threshold of the last pruning layer (default 0.01)")
    p.add_argument("--soft-epochs", type=float, help="epochs of the soft stage (default 3)")
    p.add_argument("--hard-epochs", type=float, help="epochs of the hard stage (default 2)")
    p.add_argument("--max-steps", type=int, help="steps per stage, overriding the epochs (quick runs)")
    p.add_argument("--rule", choices=("threshold", "topk"), help="topk: the fixed keep-ratio baseline")
    p.add_argument("--keep-rate", type=float, help="topk: keep ratio after the last pruning layer")
    p.add_argument("--learning-rate", type=float, help="weights (default 2e-5)")
    p.add_argument("--threshold-learning-rate", type=float, help="thresholds (default 2e-4)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-seq-length", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--recipe", help="YAML recipe whose keys are TokenPruningConfig fields")
    p.add_argument("--data-dir", help="directory with glue/TASK/{train,dev}.tsv[.gz] (or $COMPRESS_DATA_DIR)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from compress.recipes import load_recipe, resolve
    from compress.token_pruning.config import TokenPruningConfig
    from compress.token_pruning.pipeline import format_summary, token_prune

    overrides = {k: v for k, v in vars(args).items() if k not in ("func", "command", "recipe")}
    cfg = resolve(TokenPruningConfig, load_recipe(args.recipe), **overrides)
    record = token_prune(cfg)
    print(format_summary(record))
    print(f"saved to {cfg.output}")
    return 0

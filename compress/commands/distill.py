"""`compress distill`: recover a pruned model by distillation from its dense parent (compress.distill).

A Gemma student learns its teacher's next-token distributions (compress.distill.trainer); an encoder student
(a slimmed sentence-embedding model) its teacher's pooled embeddings (compress.distill.embedding). The
student's config says which; a flag of the other kind is refused.
"""

from __future__ import annotations

from compress.commands._common import overrides

DISTILL_FLAGS = ("seq_len", "batch_size", "lr", "evals", "eval_every", "eval_windows", "save_every",
                 "save_minutes", "sample", "train_embeddings", "activation_checkpointing")
EMBEDDING_FLAGS = ("batch_size", "lr", "train_embeddings", "relational")  # also the encoder's own: steps, max_seq_length
DECODER_ONLY = ("tokens", "seq_len", "evals", "eval_every", "eval_windows", "save_every", "save_minutes", "sample",
                "activation_checkpointing", "resume")


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="recover a pruned model by distillation from its dense parent",
                              description="Knowledge distillation of a slimmed model from the model it was pruned "
                                          "from: a Gemma learns the teacher's next-token distributions (KL), a "
                                          "sentence-embedding encoder its pooled embeddings (MSE and in-batch "
                                          "cosine similarities; no labels). The output is a slimmed checkpoint "
                                          "like the student's.")
    p.add_argument("student", metavar="STUDENT", help="slimmed Gemma or encoder directory (from `compress prune`)")
    p.add_argument("--teacher", metavar="PARENT", help="the dense model it was pruned from (directory or name)")
    p.add_argument("-o", "--output", metavar="DIR", help="output directory (may be STUDENT itself)")
    p.add_argument("--calib", help="training text: a .txt/.txt.gz file, a directory of them, or bbc-news (default: "
                                   "the shared Wikipedia sample's head, else text the teacher samples)")
    p.add_argument("--data-dir", default=None, help="shared data directory (default $COMPRESS_DATA_DIR)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--tokens", type=int, help="training tokens (default 10M on a GPU, 16k on a CPU)")
    add_distill_flags(p)
    g = p.add_argument_group("encoders (sentence-embedding students)",
                             "--batch-size (passages a step) defaults to 32 on a CPU and 64 on a GPU, --lr to 1e-4; "
                             "--tokens, --seq-len, --eval-*, --save-*, --no-sample, --activation-checkpointing and "
                             "--resume are a Gemma's only")
    g.add_argument("--steps", type=int, help="optimizer steps, each on --batch-size fresh passages (default 1000 on "
                                             "a CPU, 2000 on a GPU)")
    g.add_argument("--max-seq-length", type=int, help="passages cut to this many tokens (default 128)")
    add_embedding_flags(g)
    p.add_argument("--seed", type=int, help="seed of the data order and of the teacher's samples (default 0)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="go on from the checkpoint in DIR (same settings; a fresh start if DIR does not exist)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output directory")
    p.set_defaults(func=run)


def add_distill_flags(p, prefix: str = "") -> None:
    """The training flags; `compress prune` takes them as --distill-* (its --seq-len and --batch-size calibrate)."""
    def add(name, **kwargs):
        p.add_argument(f"--{prefix}{name}", dest=f"{prefix}{name}".replace("-", "_"), default=None, **kwargs)

    add("seq-len", type=int, help="training window in tokens, BOS included (default 1024 on a GPU, 128 on a CPU)")
    add("batch-size", type=int,
        help="windows per step (default 16 on a GPU, 2 on a CPU); lower it if the GPU runs out of memory")
    add("lr", type=float, help="peak learning rate (default 1e-4; 5e-4 diverged on the 270M, docs/experiments.md)")
    add("evals", type=int, help="held-out evaluations per run, after the one before training (default 10 on a "
                                 "GPU, 2 on a CPU)")
    add("eval-every", type=int, help="steps between held-out evaluations (default: from --evals)")
    add("eval-windows", type=int,
        help="held-out windows cut from the end of the text (default 32 on a GPU, 4 on a CPU)")
    add("save-every", type=int, help="steps between checkpoints (default: every --save-minutes)")
    add("save-minutes", type=float, help="minutes between checkpoints (default 10)")
    p.add_argument(f"--{prefix}no-sample", dest=f"{prefix}sample".replace("-", "_"), action="store_false", default=None,
                   help="never let the teacher sample text: a short text repeats in epochs instead")
    add("train-embeddings", action="store_true",
        help="also train the embedding (tied to the LM head; default: kept as the teacher's)")
    add("activation-checkpointing", action="store_true",
        help="recompute activations in the backward pass: less GPU memory, slower")


def add_embedding_flags(p, prefix: str = "") -> None:
    """The encoder's own training flags (its --batch-size, --lr and --train-embeddings are the shared ones)."""
    p.add_argument(f"--{prefix}relational", dest=f"{prefix}relational".replace("-", "_"), type=float, default=None,
                   help="encoders: weight of the in-batch cosine-similarity loss beside the embedding MSE (default 1)")


def embedding_overrides(args, prefix: str = "") -> dict:
    """The encoder's training flags the user gave, keyed by EmbedDistillConfig field; a UserError for a decoder's."""
    from compress.errors import UserError

    def flag(name):
        return getattr(args, f"{prefix}{name}".replace("-", "_"), None)

    given = [name for name in DECODER_ONLY if flag(name) is not None]
    if given:
        raise UserError(f"--{prefix}{given[0].replace('_', '-')} applies to a Gemma student; an encoder trains for "
                        f"--{'distill-' if prefix else ''}steps on passages")
    return {name: flag(name) for name in EMBEDDING_FLAGS if flag(name) is not None}


def distill_overrides(args, prefix: str = "") -> dict:
    """The training flags the user gave, keyed by DistillConfig field."""
    fields = {name: f"{prefix}{name}".replace("-", "_") for name in DISTILL_FLAGS}
    return {name: getattr(args, flag) for name, flag in fields.items() if getattr(args, flag, None) is not None}


def run(args) -> int:
    from compress.distill.embedding import is_encoder
    from compress.errors import UserError

    encoder = is_encoder(args.student)
    if args.teacher and is_encoder(args.teacher) != encoder:
        student, teacher = ("an encoder", "a Gemma decoder") if encoder else ("a Gemma decoder", "an encoder")
        raise UserError(f"the student {args.student} is {student} but the teacher {args.teacher} is {teacher}: "
                        "not a Gemma pair, nor an encoder and its parent")
    if encoder:
        return run_embedding(args)

    for name in ("steps", "max_seq_length", "relational"):
        if getattr(args, name, None) is not None:
            raise UserError(f"--{name.replace('_', '-')} applies to an encoder student; a Gemma trains for --tokens")
    return run_decoder(args)


def run_embedding(args) -> int:
    from compress.distill.embed_config import EmbedDistillConfig
    from compress.distill.embedding import distill_embedding
    from compress.distill.embedding import format_record as describe
    from compress.recipes import resolve

    names = ("steps", "max_seq_length", "calib", "data_dir", "device", "seed", "overwrite", "output", "teacher")
    config = resolve(EmbedDistillConfig, None, student=args.student, **overrides(args, names),
                     **embedding_overrides(args))
    print(describe(distill_embedding(config), config.output))
    return 0


def run_decoder(args) -> int:
    from compress.distill.config import DistillConfig
    from compress.distill.trainer import distill
    from compress.recipes import resolve

    names = ("tokens", "calib", "data_dir", "device", "seed", "resume", "overwrite", "output", "teacher")
    config = resolve(DistillConfig, None, student=args.student, **overrides(args, names), **distill_overrides(args))
    record = distill(config)
    print(format_record(record, config.output))
    return 0


def format_record(record: dict, output) -> str:
    first, last = record["history"][0], record["history"][-1]
    return (f"distilled {record['student']} from {record['teacher']}: {record['tokens_done']:,} tokens in "
            f"{record['seconds']:.0f} s ({record['tokens_per_second']:,.0f} tokens/s)\n"
            f"  held-out perplexity {first['perplexity']:.3f} -> {last['perplexity']:.3f}, KL {first['kl']:.4f} -> "
            f"{last['kl']:.4f}, top-1 agreement {first['agreement']:.1%} -> {last['agreement']:.1%}\n"
            f"  saved to {output}")

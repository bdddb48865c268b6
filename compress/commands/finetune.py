"""`compress finetune`: fine-tune an encoder for a GLUE task or bbc-news."""

from __future__ import annotations

from compress.commands._common import add_data_flags, overrides

FIELDS = ("model", "task", "output", "epochs", "max_steps", "learning_rate", "batch_size", "max_seq_length",
          "seed", "data_dir", "device", "overwrite")


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune an encoder for sequence classification/regression",
                              description="Fine-tune an encoder (AdamW, warmup + linear decay, dynamic padding).")
    p.add_argument("--model", help="local directory, offline name (minilm, mpnet-base) or hub id")
    p.add_argument("--task", help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or bbc-news")
    p.add_argument("-o", "--output", help="output directory (written atomically)")
    p.add_argument("--recipe", help="YAML file whose keys are the settings below; flags override it")
    p.add_argument("--epochs", type=float, help="epochs (default: the task's, 3 for GLUE, 1 for bbc-news)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--learning-rate", type=float, help="peak AdamW learning rate (default: the task's, 5e-5 for GLUE, 2e-4 for bbc-news)")
    p.add_argument("--batch-size", type=int, help="examples per step (default 32)")
    p.add_argument("--max-seq-length", type=int,
                   help="truncate inputs to this many tokens (default: the task's, 128; SQuAD 384)")
    p.add_argument("--seed", type=int, help="seed for shuffling and head init (default 0)")
    add_data_flags(p)
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output directory")
    p.set_defaults(func=run)


def run(args) -> int:
    from compress.recipes import load_recipe, resolve
    from compress.train.config import FinetuneConfig
    from compress.train.finetune import finetune

    config = resolve(FinetuneConfig, load_recipe(args.recipe), **overrides(args, FIELDS))
    summary = finetune(config)
    print(f"fine-tuned {summary['model']} on {summary['task']}: {summary['steps']} steps, "
          f"final loss {summary['final_loss']:.4f}, {summary['seconds']:.0f} s -> {config.output}")
    return 0

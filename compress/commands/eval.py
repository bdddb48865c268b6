"""`compress eval`: dev-set metrics of a fine-tuned or pruned encoder (GLUE's official metrics, SQuAD's EM/F1,
plus the average FLOPs ratio of a token-pruned model), of an embedding model (stsb-embed, bbc-news-embed:
compress.embeddings.evaluate), or the perplexity of a decoder on held-out text."""

from __future__ import annotations

import json
from pathlib import Path

from compress.commands._common import add_data_flags, add_perplexity_flags

EMBEDDING_TASKS = ("stsb-embed", "bbc-news-embed")  # compress.embeddings.evaluate.TASKS, kept light for --help


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on a task's dev split or on held-out text",
                              description="Dev-set evaluation with GLUE's official metrics (--task), or "
                                          "perplexity of a causal LM (--perplexity PATH).")
    p.add_argument("model", metavar="DIR", help="model directory (or offline name / hub id)")
    p.add_argument("--task", help="cola, sst2, mrpc, stsb, qqp, mnli, mnli-mm, qnli, rte, bbc-news, squad or squad_v2; "
                                  "an embedding model: stsb-embed (cosine Spearman on STS-B dev) or bbc-news-embed "
                                  "(nearest-neighbour accuracy of BBC News articles)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="also write the metrics to this JSON file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-seq-length", type=int, default=None, help="default: the task's (128; SQuAD 384)")
    add_data_flags(p)
    add_perplexity_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from compress.models import checkpoint
    from compress import token_pruning
    from compress.errors import UserError
    from compress.data.tasks import get_task, resolve_data_dir

    if args.perplexity and args.task:
        raise UserError("give --task (dev-set metrics) or --perplexity (held-out text), not both")
    if args.perplexity:
        return _perplexity(args)
    if not args.task:
        raise UserError("give --task TASK (an encoder's dev set) or --perplexity PATH (a decoder's held-out text)")
    if args.task in EMBEDDING_TASKS:
        return _embedding(args)
    task = get_task(args.task)
    if getattr(task, "is_qa", False):  # SQuAD: a table of EM/F1; predictions and metrics in --json
        return _squad(args)
    resolve_data_dir(args.data_dir)
    path = checkpoint.resolve(args.model)
    if token_pruning.is_token_pruned(path):
        result = token_pruning.evaluate_dir(path, task.name, args.data_dir, args.device or "auto", args.batch_size,
                                            args.max_seq_length or task.max_seq_length)
    else:
        result = _evaluate(path, task, args)
    _report(result, task, args)
    return 0


def _embedding(args) -> int:
    """An embedding check of DIR (pooled as its directory says): one line, and the JSON when asked."""
    from compress.embeddings.evaluate import evaluate_dir

    result = evaluate_dir(args.model, args.task, args.data_dir, args.device or "auto", args.batch_size,
                          args.max_seq_length)
    print(f"{args.task} ({result['num_examples']} examples): "
          + ", ".join(f"{k} {v:.2f}" for k, v in result.items() if k != "num_examples"))
    _write_json(args, {"model": str(args.model), "task": args.task, "metrics": result})
    return 0


def _evaluate(path, task, args) -> dict:
    from compress.models import checkpoint
    from compress.train.evaluate import evaluate

    model, tokenizer = checkpoint.load(path), checkpoint.load_tokenizer(path)
    return evaluate(model, tokenizer, task, args.data_dir, args.device or "auto", args.batch_size,
                    args.max_seq_length)


def _report(result: dict, task, args) -> None:
    """One line of metrics (a token-pruned model's average FLOPs ratios included); the JSON when asked."""
    digits = {k: 3 if k.endswith("flops_ratio") else 2 for k in result}  # ratios in [0, 1], metrics in percent
    print(f"{task.name} dev ({result['num_examples']} examples): "
          + ", ".join(f"{k} {v:.{digits[k]}f}" for k, v in result.items() if k != "num_examples"))
    _write_json(args, {"model": str(args.model), "task": task.name, "metrics": result})


def _perplexity(args) -> int:
    """Perplexity of a Gemma decoder on held-out text; the settings and result in --json."""
    from compress.data.perplexity import measure
    from compress.device import pick_device
    from compress.errors import UserError
    from compress.models import checkpoint
    from compress.pruning.decoder import is_decoder

    if not is_decoder(args.model):
        raise UserError(f"--perplexity needs a Gemma decoder; {args.model} is not one (use --task for an encoder)")
    path = checkpoint.resolve(args.model)
    model = checkpoint.load(path, pick_device(args.device or "auto"))
    result = measure(model, checkpoint.load_tokenizer(path), args)
    print(f"perplexity {result['perplexity']:.3f} on {result['text']} ({result['num_tokens']} tokens, "
          f"{result['num_windows']} windows of {result['seq_len']})")
    _write_json(args, {"model": str(args.model), "perplexity": result})
    return 0


def _squad(args) -> int:
    """SQuAD dev EM/F1 of DIR: a table, and the predictions with the metrics in --json."""
    from compress.data.squad import get_qa_task, load_squad, qa_config
    from compress.train.qa import evaluate_model, format_table, load_qa_eval_model

    task = get_qa_task(args.task).name
    examples = load_squad(task, "dev", args.data_dir)
    model, tokenizer = load_qa_eval_model(args.model, args.device or "auto")
    result = evaluate_model(model, tokenizer, task, examples, qa_config(args.max_seq_length, model),
                            args.batch_size)
    result.update(model=str(args.model), split="dev", num_examples=len(examples))
    print(format_table(result))
    _write_json(args, result)
    return 0


def _write_json(args, payload: dict) -> None:
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(payload, indent=2) + "\n")

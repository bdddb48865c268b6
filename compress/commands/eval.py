"""`compress eval`: dev-set metrics of a fine-tuned or pruned model (GLUE's official metrics)."""

from __future__ import annotations

from compress.commands._common import add_data_flags


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on a task's dev split",
                              description="Dev-set evaluation with GLUE's official metrics.")
    p.add_argument("model", metavar="DIR", help="model directory (or offline name / hub id)")
    p.add_argument("--task", required=True, help="cola, sst2, mrpc, stsb, qqp, mnli, mnli-mm, qnli, rte or bbc-news")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="also write the metrics to this JSON file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-seq-length", type=int, default=128)
    add_data_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from compress import modeling
    from compress.evaluation import evaluate
    from compress.tasks import get_task, resolve_data_dir

    task = get_task(args.task)
    if getattr(task, "is_qa", False):  # SQuAD: table, predictions and JSON from evals/squad.py
        from evals.squad import run_eval_command
        return run_eval_command(args)
    resolve_data_dir(args.data_dir)
    path = modeling.resolve(args.model)
    model, tokenizer = modeling.load(path), modeling.load_tokenizer(path)
    result = evaluate(model, tokenizer, task, args.data_dir, args.device or "auto", args.batch_size,
                      args.max_seq_length)
    print(f"{task.name} dev ({result['num_examples']} examples): "
          + ", ".join(f"{k} {v:.2f}" for k, v in result.items() if k != "num_examples"))
    if args.json_out:
        out = {"model": str(args.model), "task": task.name, "metrics": result}
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0

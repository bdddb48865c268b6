"""GLUE dev-set evaluation of one or more models (official metrics from compress.data.metrics).

    python evals/glue.py runs/minilm-sst2 runs/minilm-sst2-flops50 --task sst2 --data-dir ../shared/data \
        --json evals/results/glue_eval.json

Same numbers as `compress eval DIR --task TASK`; this script evaluates several models in one call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model directories (or offline names / hub ids)")
    parser.add_argument("--task", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)

    from compress.models import checkpoint
    from compress.errors import UserError
    from compress.train.evaluate import evaluate
    from compress.data.tasks import get_task, load_split

    try:
        task = get_task(args.task)
        dev = load_split(task, "dev", args.data_dir)
        results = {}
        for name in args.models:
            path = checkpoint.resolve(name)
            model, tokenizer = checkpoint.load(path), checkpoint.load_tokenizer(path)
            results[name] = evaluate(model, tokenizer, task, device=args.device, examples=dev)
            print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[name].items() if k != "num_examples"))
    except UserError as err:
        print(f"evals/glue.py: error: {err}", file=sys.stderr)
        return 2
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"task": task.name, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

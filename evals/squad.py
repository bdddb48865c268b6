"""SQuAD v1.1 / v2.0 exact match and F1 from the command line: `python -m evals.squad --help`.

The library does the work (compress.data.squad reads the official JSON and scores predictions files,
compress.train.qa windows, predicts and decodes); `compress eval DIR --task squad|squad_v2` runs the same
evaluation. This script adds what only a benchmark needs: another split, a question limit, window
settings, and `--score` of an existing predictions file like the official evaluate-v1.1.py / -v2.0.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if not __package__:  # run as a file (`python evals/squad.py`): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.data.squad import VERSIONS, score_files  # noqa: E402
from compress.errors import UserError, exit_code  # noqa: E402
from compress.train.qa import evaluate_dir, format_table  # noqa: E402


EPILOG = """\
Full evaluation on the official files (not available on the offline machines):
  for f in train-v1.1 dev-v1.1 train-v2.0 dev-v2.0; do
    wget -P data/squad https://rajpurkar.github.io/SQuAD-explorer/dataset/$f.json; done
  compress finetune --model bert-base --task squad --data-dir data -o runs/bert-squad
  compress prune --model runs/bert-squad --task squad --flops 0.5 --data-dir data -o runs/bert-squad-50
  python -m evals.squad runs/bert-squad-50 --task squad --data-dir data --json squad.json
  (same with --task squad_v2; `compress eval DIR --task squad` runs this evaluation too)
Without --data-dir (and COMPRESS_DATA_DIR unset) the rajpurkar/squad[_v2] datasets are read online.
Score an existing predictions file like the official evaluate-v1.1.py / evaluate-v2.0.py:
  python -m evals.squad --score data/squad/dev-v2.0.json predictions.json [--na-scores na.json]
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.squad", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="SQuAD v1.1/v2.0 exact match and F1 of a question-answering model.")
    p.add_argument("model", nargs="?", help="model directory (fine-tuned or pruned) or model name")
    p.add_argument("--task", default="squad", choices=sorted(VERSIONS))
    p.add_argument("--data-dir", help="directory holding squad/{train,dev}-v1.1.json[.gz] / -v2.0")
    p.add_argument("--split", default="dev", choices=("dev", "train"))
    p.add_argument("--json", help="write metrics, predictions and no-answer scores here")
    p.add_argument("--limit", type=int, help="evaluate only the first N questions")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--doc-stride", type=int, help="context tokens shared by consecutive windows "
                   "(default: a third of --max-length, 128 at 384; questions are cut to min(64, that))")
    p.add_argument("--max-answer-length", type=int, default=30)
    p.add_argument("--null-threshold", type=float, default=0.0, help="v2.0: answer '' above this no-answer score")
    p.add_argument("--device", default="auto")
    p.add_argument("--score", nargs=2, metavar=("DATASET_JSON", "PREDICTIONS_JSON"),
                   help="only score a predictions file (no model)")
    p.add_argument("--na-scores", help="with --score: qid -> no-answer score JSON (v2.0 threshold search)")
    return p


def run(args) -> dict:
    if args.score:
        result = {"task": "squad", "model": args.score[1], "metrics": score_files(*args.score, args.na_scores)}
    else:
        from compress.data.qa import QAConfig

        if not args.model:
            raise UserError("give a model directory (or --score DATASET PREDICTIONS)")
        try:
            third = args.max_length // 3
            cfg = QAConfig(args.max_length, third if args.doc_stride is None else args.doc_stride,
                           args.max_answer_length, null_threshold=args.null_threshold,
                           max_question_tokens=min(64, third))
        except ValueError as err:
            raise UserError(str(err)) from None
        result = evaluate_dir(args.model, args.task, args.data_dir, args.split, args.limit,
                              args.batch_size, cfg, args.device)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    return exit_code("evals.squad", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

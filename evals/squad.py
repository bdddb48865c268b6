"""SQuAD v1.1 / v2.0 evaluation: read the official JSON, run a QA model over windows, score officially.

`load_squad` reads `DIR/squad/{train,dev}-v1.1.json[.gz]` (task `squad`) or `-v2.0` (task
`squad_v2`), or the `rajpurkar/squad[_v2]` datasets when online; `evaluate_model` windows the
questions (compress.data.qa), predicts start/end logits, decodes the n-best spans across windows and
scores them with evals.squad_metrics (the official definitions). `main` is the command line
(`python -m evals.squad --help`); `compress eval DIR --task squad|squad_v2` calls `evaluate_dir`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from pathlib import Path

if not __package__:  # run as a file (`python evals/squad.py`): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.errors import UserError, exit_code  # noqa: E402
from evals.squad_metrics import squad_scores  # noqa: E402

VERSIONS = {"squad": "v1.1", "squad_v2": "v2.0"}
HF_DATASETS = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}
DATA_HINT = ("pass --data-dir DIR (or set COMPRESS_DATA_DIR) with DIR/squad/{split}-{version}.json[.gz], "
             "the official files from https://rajpurkar.github.io/SQuAD-explorer/")


def check_task(task: str) -> str:
    if task not in VERSIONS:
        raise UserError(f"unknown QA task {task!r}; choose squad (v1.1) or squad_v2 (v2.0)")
    return task


def read_squad_file(path: str | Path) -> list[dict]:
    """Flatten an official SQuAD JSON file into one dict per question (see compress.data.qa)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            articles = json.load(f)["data"]
        return [_example(p["context"], qa, a.get("title", "")) for a in articles
                for p in a["paragraphs"] for qa in p["qas"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a readable SQuAD JSON file ({type(err).__name__}: {err})") from None


def _example(context: str, qa: dict, title: str) -> dict:
    answers = [] if qa.get("is_impossible") else qa["answers"]
    return {"id": qa["id"], "title": title, "question": qa["question"], "context": context,
            "answers": [a["text"] for a in answers], "answer_starts": [int(a["answer_start"]) for a in answers]}


def load_squad(task: str, split: str = "dev", data_dir=None) -> list[dict]:
    """The questions of `split` ("train" or "dev") from the data directory, else `datasets` online."""
    from compress.data.tasks import resolve_data_dir

    version = VERSIONS[check_task(task)]
    hint = DATA_HINT.format(split=split, version=version)
    root = resolve_data_dir(data_dir)
    if root is None:
        return _from_datasets(task, split, hint)
    for suffix in (".json", ".json.gz"):
        path = root / "squad" / f"{split}-{version}{suffix}"
        if path.is_file():
            return read_squad_file(path)
    raise UserError(f"{task} {split} split not found at {root}/squad/{split}-{version}.json[.gz]; {hint}")


def _from_datasets(task: str, split: str, hint: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"no data directory given and the `datasets` package is missing; {hint}") from None
    try:
        rows = datasets.load_dataset(HF_DATASETS[task], split="train" if split == "train" else "validation")
    except Exception as err:  # network or hub failure: the user must supply the files
        raise UserError(f"could not load {HF_DATASETS[task]} with `datasets` ({type(err).__name__}); {hint}") from None
    return [{"id": r["id"], "title": r["title"], "question": r["question"], "context": r["context"],
             "answers": list(r["answers"]["text"]), "answer_starts": list(r["answers"]["answer_start"])}
            for r in rows]


def evaluate_model(model, tokenizer, task: str, examples: list[dict], cfg=None, batch_size: int = 32,
                   progress: bool = True) -> dict:
    """Metrics, predictions and (v2.0) no-answer scores of a QA model on `examples`."""
    from compress.data.qa import QAConfig, decode, featurize, predict_logits

    cfg = cfg or QAConfig()
    v2 = task == "squad_v2"
    feats = featurize(examples, tokenizer, cfg, train=False, progress=progress)
    starts, ends = predict_logits(model, feats, batch_size, progress=progress)
    predictions, spans, na_scores = decode(examples, feats, starts, ends, cfg, v2)
    answers = {ex["id"]: ex["answers"] for ex in examples}
    metrics = squad_scores(predictions, answers, na_scores if v2 else None, spans)
    metrics.update(num_windows=len(feats))
    return {"task": task, "metrics": metrics, "predictions": predictions,
            "na_scores": {k: _finite(v) for k, v in na_scores.items()}}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no infinity; None = no valid span at all


def load_qa_model(model_dir, device: str = "auto"):
    """(model, tokenizer) for a QA model directory (dense, fine-tuned or slimmed) or model name."""
    from compress.models import checkpoint
    from compress.train.evaluate import pick_device

    path = checkpoint.resolve(model_dir)
    arch = getattr(checkpoint.read_config(path), "architectures", None) or []
    if not any(a.endswith("ForQuestionAnswering") for a in arch):
        raise UserError(f"{path} has no question-answering head; fine-tune it first: "
                        f"compress finetune --model {model_dir} --task squad -o DIR")
    model = checkpoint.load(path)  # strict loading, uneven (slimmed) layers included
    return model.to(pick_device(device)), checkpoint.load_tokenizer(path)


def evaluate_dir(model_dir, task: str, data_dir=None, split: str = "dev", limit: int | None = None,
                 batch_size: int = 32, cfg=None, device: str = "auto", progress: bool = True) -> dict:
    """Load a model directory and the split, then `evaluate_model`."""
    examples = load_squad(task, split, data_dir)[: limit or None]
    model, tokenizer = load_qa_model(model_dir, device)
    result = evaluate_model(model, tokenizer, task, examples, cfg, batch_size, progress)
    result.update(model=str(model_dir), split=split, num_examples=len(examples))
    return result


def run_eval_command(args) -> int:
    """`compress eval DIR --task squad|squad_v2` (flags of compress/commands/eval.py)."""
    from compress.train.qa import get_qa_task, qa_config

    task = get_qa_task(args.task).name
    examples = load_squad(task, "dev", args.data_dir)
    model, tokenizer = load_qa_model(args.model, args.device or "auto")
    result = evaluate_model(model, tokenizer, task, examples, qa_config(args.max_seq_length, model),
                            args.batch_size)
    result.update(model=str(args.model), split="dev", num_examples=len(examples))
    print(format_table(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def format_table(result: dict) -> str:
    """A two-column text table of the metrics of one `evaluate_*` result."""
    metrics = result["metrics"]
    rows = [(k, f"{v:.2f}" if isinstance(v, float) else "-" if v is None else str(v)) for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows)
    head = f"{result['task']} {result.get('split', 'dev')} ({result.get('model', 'model')})"
    return "\n".join([head] + [f"  {k:<{width}}  {v:>10}" for k, v in rows])


def score_files(dataset_file, predictions_file, na_scores_file=None) -> dict:
    """Score a predictions JSON (qid -> text) like the official scripts do."""
    examples = read_squad_file(dataset_file)
    predictions = json.loads(Path(predictions_file).read_text())
    na = json.loads(Path(na_scores_file).read_text()) if na_scores_file else None
    answers = {ex["id"]: ex["answers"] for ex in examples}
    try:
        return squad_scores(predictions, answers, na)
    except ValueError as err:
        raise UserError(str(err)) from None


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

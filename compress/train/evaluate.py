"""Dev-set evaluation of a sequence-classification model on a task (`compress eval`, `--eval`).

Predictions are argmax of the logits (classification) or the single logit (regression); metrics
are GLUE's official ones from `compress.data.metrics`. On CUDA the forward runs under bf16 autocast.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from compress.data import batching, metrics
from compress.data.tasks import Task, load_split
from compress.device import autocast, pick_device


@torch.inference_mode()
def predict(model, features, batch_size, pad_id, device, is_regression, progress=True):
    preds = []
    for batch in tqdm(list(batching.batches(features, batch_size, pad_id)), desc="eval", unit="batch",
                      disable=not progress, leave=False):
        batch = batching.to_device(batch, device)
        batch.pop("labels")
        with autocast(device):
            logits = model(**batch).logits.float()
        preds.append(logits.squeeze(-1) if is_regression else logits.argmax(-1))
    return torch.cat(preds).cpu().numpy() if preds else []


def evaluate(model, tokenizer, task: Task, data_dir=None, device="auto", batch_size=64,
             max_seq_length=None, examples=None, progress=True) -> dict[str, float]:
    """The task's dev metrics (percent) for `model`, plus `num_examples` (None length: the task's default)."""
    if getattr(task, "is_qa", False):  # SQuAD: windows, span decoding, EM/F1 (compress.train.qa)
        from compress.train.qa import evaluate as evaluate_qa
        return evaluate_qa(model, tokenizer, task, data_dir, device, batch_size, max_seq_length, progress)
    device = pick_device(device) if isinstance(device, str) else device
    examples = examples if examples is not None else load_split(task, "dev", data_dir)
    features = batching.encode(tokenizer, examples, max_seq_length or task.max_seq_length)
    model = model.to(device).eval()
    preds = predict(model, features, batch_size, batching.pad_id_of(tokenizer), device, task.is_regression, progress)
    result = metrics.compute(task.metrics, preds, [e[2] for e in examples])
    result["num_examples"] = len(examples)
    return result

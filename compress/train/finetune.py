"""Sequence-classification / regression fine-tuning (`compress finetune`), needed because the
encoders available offline are not fine-tuned.

Standard recipe: AdamW, linear warmup then linear decay, dynamic padding, seeded shuffling; bf16
autocast on GPU. The output directory (written atomically) holds the model, tokenizer and
`finetune.json` (resolved config, steps, final loss, seconds).
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from compress.data import batching
from compress.models import checkpoint
from compress.train.config import FinetuneConfig
from compress.errors import UserError
from compress.device import autocast, pick_device
from compress.train.loop import make_optimizer, save_finetuned, task_loss
from compress.models.outputs import check_output_dir
from compress.data.tasks import resolve_data_dir, get_task, load_split


def load_for_finetune(path, task):
    """The model at `path` with a (possibly new) head sized for `task`."""
    from transformers import AutoModelForSequenceClassification

    config = checkpoint.read_config(path)
    if checkpoint.has_task_head(config) and config.num_labels != task.num_labels:
        raise UserError(f"model {path} has {config.num_labels} labels but task {task.name} has {task.num_labels}")
    kind = "regression" if task.is_regression else "single_label_classification"
    config.num_labels, config.problem_type = task.num_labels, kind
    if task.labels:
        config.id2label = {i: name for i, name in enumerate(task.labels)}
        config.label2id = {name: i for i, name in enumerate(task.labels)}
    config.compress_task = task.name
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch.float32)  # fp32 master weights, whatever the checkpoint dtype
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot load model {path}: {str(err).splitlines()[0][:160]}") from None
    return model


def finetune(config: FinetuneConfig) -> dict:
    """Fine-tune `config.model` on `config.task`; returns the summary written to finetune.json."""
    config.validate()
    check_output_dir(config.output, config.overwrite)
    resolve_data_dir(config.data_dir)
    task = get_task(config.task)
    if getattr(task, "is_qa", False):  # SQuAD: span loss on windows (compress.train.qa)
        from compress.train.qa import finetune as finetune_qa
        return finetune_qa(config, task)
    path = checkpoint.resolve(config.model)
    train = load_split(task, "train", config.data_dir)
    tokenizer = checkpoint.load_tokenizer(path)
    model = load_for_finetune(path, task)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    losses = train_loop(model, tokenizer, train, config, device)
    return save_finetuned(model, tokenizer, config, task, losses, time.perf_counter() - t0)


def train_loop(model, tokenizer, train, config: FinetuneConfig, device) -> list[float]:
    task = get_task(config.task)
    features = batching.encode(tokenizer, train, config.max_seq_length or task.max_seq_length)
    per_epoch = math.ceil(len(features) / config.batch_size)
    epochs = config.epochs if config.epochs is not None else task.default_epochs
    total = config.max_steps or max(1, math.ceil(epochs * per_epoch))
    model.to(device).train()
    optimizer, scheduler = make_optimizer(model, config, total)
    losses, step, pad = [], 0, batching.pad_id_of(tokenizer)
    with tqdm(total=total, desc="finetune", unit="step") as bar:
        while step < total:
            for batch in batching.batches(features, config.batch_size, pad, shuffle=True, seed=config.seed + step):
                loss = _step(model, batch, device, optimizer, scheduler)
                losses.append(loss)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if step >= total:
                    break
    model.eval()
    return losses


def _step(model, batch, device, optimizer, scheduler) -> float:
    batch = batching.to_device(batch, device)
    labels = batch.pop("labels")
    with autocast(device):
        logits = model(**batch).logits
    loss = task_loss(logits, labels) / labels.shape[0]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())

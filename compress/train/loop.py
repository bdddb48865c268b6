"""What the two fine-tuning loops share (classification/regression in compress.train.finetune, SQuAD spans
in compress.train.qa): the per-example task loss, AdamW with linear warmup and decay, and the atomic save.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from torch.nn import functional as F

from compress.data.tasks import get_task
from compress.models import checkpoint
from compress.models.outputs import atomic_output_dir
from compress.train.config import FinetuneConfig


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed per-example loss: cross entropy for classification, squared error for regression."""
    if labels.dtype.is_floating_point:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="sum")
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def make_optimizer(model, config: FinetuneConfig, total: int):
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.learning_rate or get_task(config.task).default_learning_rate)
    warmup = int(config.warmup_ratio * total)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def save_finetuned(model, tokenizer, config, task, losses: list[float], seconds: float, **extra) -> dict:
    """Write the model, tokenizer and finetune.json (atomically); return the summary."""
    summary = {"model": str(config.model), "task": task.name, "steps": len(losses), **extra,
               "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1),
               "seconds": round(seconds, 2), "config": dataclasses.asdict(config)}
    with atomic_output_dir(config.output, config.overwrite) as tmp:
        checkpoint.save(model.cpu(), tokenizer, tmp)
        (tmp / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

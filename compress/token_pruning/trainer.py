"""Training and inference loops of learned token pruning (Kim et al. 2022, Sec. 3.3).

Stage "soft": the model and the thresholds train together on task loss + lambda * mean mask, the
thresholds with their own Adam optimizer and learning rate (they live on the scale of one attention
probability, ~1/sequence length, far from the weights' scale). Stage "hard": thresholds frozen,
tokens under them dropped (masked formulation, so a batch keeps its shape), the weights fine-tuned.
The top-k baseline has nothing to learn in the soft stage and runs the hard stage only.
`predict` runs the real token-dropping forward and returns what `flops.py` needs. On CUDA both run
under bf16 autocast (as the core's fine-tuning and evaluation do); importances stay fp32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from compress.data.batching import batches, to_device
from compress.device import autocast
from compress.token_pruning.config import TokenPruningConfig
from compress.token_pruning.model import TokenPruningModel


@dataclass
class StageStats:
    stage: str
    steps: int = 0
    loss: float = 0.0  # mean task loss over the stage
    mask_mean: float = 0.0  # mean kept fraction over the stage (soft: expected)
    seconds: float = 0.0


def num_steps(cfg: TokenPruningConfig, num_examples: int, epochs: float) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return math.ceil(epochs * math.ceil(num_examples / cfg.batch_size))


def train_stage(model: TokenPruningModel, features: list[dict], pad_id: int, cfg: TokenPruningConfig,
                stage: str, device) -> StageStats:
    """Run the soft or the hard stage for its configured number of steps."""
    soft = stage == "soft"
    epochs = cfg.soft_epochs if soft else cfg.hard_epochs
    total = num_steps(cfg, len(features), epochs)
    stats = StageStats(stage)
    if total == 0 or (soft and model.spec.rule != "threshold"):
        return stats
    start = time.perf_counter()
    model.train()
    model.thresholds.requires_grad_(soft)
    optimizers, scheduler = _optimizers(model, cfg, soft, total)
    with tqdm(total=total, desc=f"token-prune {stage}", unit="step") as bar:
        for batch in _cycle(features, pad_id, cfg, device, total):
            with autocast(device):
                out = model(**_inputs(batch), labels=batch["labels"], mode="soft" if soft else "masked")
            loss = out.loss + cfg.mask_lambda * out.mask_mean if soft else out.loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.model.parameters(), 1.0)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            scheduler.step()
            with torch.no_grad():
                model.thresholds.clamp_(0.0, 0.999)
            _accumulate(stats, out)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.3f}", kept=f"{stats.mask_mean:.2f}")
    model.eval()
    model.thresholds.requires_grad_(False)
    stats.seconds = time.perf_counter() - start
    return stats


@torch.no_grad()
def predict(model: TokenPruningModel, features: list[dict], pad_id: int, batch_size: int, device,
            mode: str = "drop", desc: str = "evaluate"):
    """Logits [N, C], labels [N] and tokens per layer [N, L] over `features`, in order."""
    model.eval()
    logits, labels, tokens = [], [], []
    num_batches = math.ceil(len(features) / batch_size)
    for batch in tqdm(batches(features, batch_size, pad_id), total=num_batches, desc=desc, leave=False):
        batch = to_device(batch, device)
        with autocast(device):
            out = model(**_inputs(batch), mode=mode)
        logits.append(out.logits.float().cpu())
        labels.append(batch["labels"].cpu())
        tokens.append(out.num_tokens.float().cpu())
    return torch.cat(logits), torch.cat(labels), torch.cat(tokens)


def _optimizers(model: TokenPruningModel, cfg: TokenPruningConfig, soft: bool, total: int):
    weights = torch.optim.AdamW(model.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total)

    def schedule(step: int) -> float:  # linear warmup, then linear decay to zero
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        return max(0.0, (total - step) / max(total - warmup, 1))

    scheduler = torch.optim.lr_scheduler.LambdaLR(weights, schedule)
    if not soft:
        return [weights], scheduler
    return [weights, torch.optim.Adam([model.thresholds], lr=cfg.threshold_learning_rate)], scheduler


def _cycle(features, pad_id, cfg: TokenPruningConfig, device, total: int):
    """`total` shuffled training batches, reshuffled every epoch."""
    step, epoch = 0, 0
    while step < total:
        for batch in batches(features, cfg.batch_size, pad_id, shuffle=True, seed=cfg.seed + epoch):
            if step == total:
                return
            step += 1
            yield to_device(batch, device)
        epoch += 1


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def _accumulate(stats: StageStats, out) -> None:
    stats.steps += 1
    stats.loss += (float(out.loss.detach()) - stats.loss) / stats.steps
    stats.mask_mean += (float(out.mask_mean.detach()) - stats.mask_mean) / stats.steps

"""The Python API, mirroring the CLI: `prune`, `finetune`, `load`, `evaluate`.

Keyword arguments are the fields of `compress.pruning.config.PruneConfig` / `compress.train.config.FinetuneConfig`
(the same names as the flags, with underscores); `recipe=` reads a YAML recipe first, and keywords override it.
"""

from __future__ import annotations

import os


def prune(model: str | os.PathLike, task: str | None, output: str | os.PathLike, *, recipe=None, progress=True,
          **settings) -> dict:
    """Prune `model` (an encoder fine-tuned on `task`, or a Gemma decoder with `task=None`) into `output`;
    returns the prune.json record.

    Examples: `compress.prune("runs/minilm-sst2", "sst2", "pruned/", flops=0.5)`,
    `compress.prune("gemma-3-270m", None, "pruned/", flops=0.8, calib="bbc-news")`.
    """
    from compress.pruning.config import PruneConfig
    from compress.pruning.pipeline import prune as run
    from compress.recipes import load_recipe, resolve

    config = resolve(PruneConfig, load_recipe(recipe), model=str(model), task=task, output=str(output), **settings)
    record = run(config, progress=progress)
    if config.distill_tokens:  # then recover by distillation from `model` (compress.distill)
        from compress.distill.trainer import distill_pruned

        record["distill"] = distill_pruned(config, progress=progress)
    if config.distill_steps:  # an embedding model: by distillation of the parent's embeddings
        from compress.distill.embedding import distill_pruned_embedding

        record["distill"] = distill_pruned_embedding(config, progress=progress)
    return record


def finetune(model: str | os.PathLike, task: str, output: str | os.PathLike, *, recipe=None, **settings) -> dict:
    """Fine-tune `model` on `task` into `output`; returns the finetune.json summary."""
    from compress.recipes import load_recipe, resolve
    from compress.train.config import FinetuneConfig
    from compress.train.finetune import finetune as run

    config = resolve(FinetuneConfig, load_recipe(recipe), model=str(model), task=task, output=str(output), **settings)
    return run(config)


def load(path: str | os.PathLike, device: str = "cpu"):
    """A plain Hugging Face torch model from a fine-tuned or slimmed directory (uneven layers allowed);
    a slimmed Gemma loads as its causal LM, a token-pruned directory as its token-dropping model, an
    encoder without a task head (an embedding model) as its bare encoder, whose pooling
    `compress.embeddings.read_pooling(DIR)` gives."""
    from compress import token_pruning
    from compress.models.checkpoint import load as run, resolve

    local = resolve(path)
    if token_pruning.is_token_pruned(local):
        return token_pruning.load(local, device)
    return run(local, device=device, allow_base=True)


def evaluate(path: str | os.PathLike, task: str, data_dir=None, device: str = "auto") -> dict:
    """Dev-set metrics (percent) of the model in `path` on `task` (and FLOPs ratios when token-pruned)."""
    from compress import token_pruning
    from compress.train.evaluate import evaluate as run
    from compress.models.checkpoint import load_tokenizer, resolve
    from compress.data.tasks import get_task

    local = resolve(path)
    if token_pruning.is_token_pruned(local):
        return token_pruning.evaluate_dir(local, task, data_dir, device)
    return run(load(local), load_tokenizer(local), get_task(task), data_dir, device)

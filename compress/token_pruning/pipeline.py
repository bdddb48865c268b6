"""`compress token-prune` as a function: load -> soft stage -> hard stage -> evaluate -> save.

Also the evaluation used by `compress eval` and evals/token_pruning.py: dev metric plus the average
FLOPs ratio of the token-dropping forward (against the parent architecture on the full input).
"""

from __future__ import annotations

import time

import torch

from compress.device import pick_device
from compress.errors import UserError
from compress.models.outputs import atomic_output_dir, check_output_dir
from compress.token_pruning import checkpoint, flops
from compress.token_pruning import parts as P
from compress.token_pruning.config import TokenPruningConfig, initial_thresholds, topk_keep_ratios
from compress.token_pruning.model import PruningSpec, TokenPruningModel
from compress.token_pruning.trainer import predict, train_stage


def load_for_task(model_dir: str, task):
    """(plain HF model, tokenizer, its directory), checked to be an encoder with `task`'s head."""
    from compress.models.checkpoint import load_tokenizer, resolve

    path = resolve(model_dir)
    config = checkpoint.read_config(path)
    kind = config.get("model_type")
    if kind not in P.SUPPORTED:
        raise UserError(f"token pruning needs a BERT-family encoder ({', '.join(P.SUPPORTED)}); {path} is {kind!r}")
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise UserError(f"{path} has no sequence-classification head; fine-tune it first (compress finetune)")
    num_labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if num_labels != task.num_labels:
        raise UserError(f"{path} predicts {num_labels} label(s) but task {task.name} has {task.num_labels}")
    model = checkpoint.load(path).model if checkpoint.CONFIG_KEY in config else checkpoint.load_plain(path)
    return model, load_tokenizer(path), path


def initial_spec(cfg: TokenPruningConfig, num_layers: int) -> PruningSpec:
    if cfg.rule == "topk":
        return PruningSpec("topk", [], topk_keep_ratios(cfg.keep_rate, num_layers), cfg.temperature)
    return PruningSpec("threshold", initial_thresholds(cfg.final_threshold, num_layers), [], cfg.temperature)


def evaluate(model: TokenPruningModel, task, features: list[dict], pad_id: int, batch_size: int = 64,
             device=None, mode: str = "drop") -> dict:
    """Dev metric(s), mean FLOPs ratio (vs. the parent on the full input) and mean tokens per layer."""
    from compress.data.metrics import compute

    device = device or next(model.parameters()).device
    logits, labels, tokens = predict(model, features, pad_id, batch_size, device, mode=mode)
    preds = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
    result = compute(task.metrics, preds.numpy(), labels.numpy())  # percent, as `compress eval` reports
    shape, parent = flops.model_shape(model.model), flops.parent_shape(model.config)
    result["flops_ratio"] = float(flops.flops_ratio(tokens, shape, parent).mean())
    result["token_flops_ratio"] = float(flops.flops_ratio(tokens, shape, shape).mean())
    result["tokens_per_layer"] = [round(float(t), 2) for t in tokens.mean(0)]
    return result


def evaluate_dir(path, task_name: str, data_dir=None, device="auto", batch_size: int = 64,
                 max_seq_length: int = 128) -> dict[str, float]:
    """`compress eval` for a token-pruned directory: metrics, FLOPs ratios and `num_examples`."""
    from compress.data.batching import encode, pad_id_of
    from compress.models.checkpoint import load_tokenizer
    from compress.data.tasks import get_task, load_split

    task, device = get_task(task_name), pick_device(device)
    model, tokenizer = checkpoint.load(path, device), load_tokenizer(path)
    examples = load_split(task, "dev", data_dir)
    features = encode(tokenizer, examples, max_seq_length)
    result = evaluate(model, task, features, pad_id_of(tokenizer), batch_size, device)
    result.pop("tokens_per_layer")
    result["num_examples"] = len(examples)
    return result


def token_prune(cfg: TokenPruningConfig) -> dict:
    """Run the whole method; writes `cfg.output` atomically and returns the summary record."""
    from compress.data.batching import encode, pad_id_of
    from compress.data.tasks import get_task, load_split

    cfg.validate()
    task = get_task(cfg.task)
    check_output_dir(cfg.output, cfg.overwrite)
    device = pick_device(cfg.device)
    hf, tokenizer, source = load_for_task(cfg.model, task)
    torch.manual_seed(cfg.seed)
    model = TokenPruningModel(hf, initial_spec(cfg, len(P.layer_parts(hf)))).to(device)
    pad = pad_id_of(tokenizer)
    train = encode(tokenizer, load_split(task, "train", cfg.data_dir), cfg.max_seq_length)
    dev = encode(tokenizer, load_split(task, "dev", cfg.data_dir), cfg.max_seq_length)
    timings = {}
    before = evaluate(model, task, dev, pad, device=device, mode="dense")
    stages = []
    for stage in ("soft", "hard"):
        stats = train_stage(model, train, pad, cfg, stage, device)
        stages.append(vars(stats))
        timings[stage] = round(stats.seconds, 1)
    start = time.perf_counter()
    after = evaluate(model, task, dev, pad, device=device)
    timings["eval"] = round(time.perf_counter() - start, 1)
    record = dict(source=str(source), task=task.name, config=cfg.to_dict(), spec=vars(model.current_spec()),
                  dev_before=before, dev_after=after, stages=stages, seconds=timings)
    with atomic_output_dir(cfg.output, cfg.overwrite) as tmp:
        checkpoint.save(model, tokenizer, tmp, record, source_dir=source)
    return record


def format_summary(record: dict) -> str:
    """The end-of-run summary: metric and FLOPs before/after, tokens per layer, thresholds, time."""
    before, after = record["dev_before"], record["dev_after"]
    metrics = [k for k in before if k not in ("flops_ratio", "token_flops_ratio", "tokens_per_layer")]
    lines = [f"token pruning of {record['source']} on {record['task']} ({record['spec']['rule']})"]
    for key in metrics:
        lines.append(f"  dev {key:<12} {before[key]:.4f} -> {after[key]:.4f}")
    lines.append(f"  FLOPs ratio       {before['flops_ratio']:.3f} -> {after['flops_ratio']:.3f} "
                 f"(token pruning alone: {after['token_flops_ratio']:.3f})")
    lines.append(f"  tokens per layer  {before['tokens_per_layer']} -> {after['tokens_per_layer']}")
    values = record["spec"]["thresholds"] or record["spec"]["keep_ratios"]
    name = "thresholds" if record["spec"]["thresholds"] else "keep ratios"
    lines.append(f"  {name:<17} {[round(v, 4) for v in values]}")
    lines.append("  seconds           " + ", ".join(f"{k} {v}" for k, v in record["seconds"].items()))
    return "\n".join(lines)

"""The post-training pruning pipeline for encoders (`compress prune`), Kwon et al. 2022 end to end.

load model -> calibration batches -> mask gradients (Fisher) -> search under the cost model ->
rearrange -> tune (least squares) -> slim -> save. Masks travel between the stages; only
`compress.arch` touches module paths. Baselines (`method` magnitude/random) replace the first three
stages by per-layer ranking at a uniform keep ratio and skip rearrangement and tuning.
With `search_steps` K > 1 the Fisher and the search run K times down to the FLOPs target, each Fisher
with the masks so far applied and each search among the units still alive; rearrangement and tuning
run once, on the last step's result.
Everything is written atomically into the output directory, with `prune.json` recording how.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from compress.data import batching
from compress.pruning import cost, search
from compress.models import checkpoint
from compress.arch import get_adapter
from compress.recipes import PruneConfig
from compress.errors import UserError
from compress.train.evaluate import evaluate, pick_device
from compress.models.outputs import atomic_output_dir, check_output_dir
from compress.data.tasks import resolve_data_dir, calibration_sample, get_task, load_split


class Phases:
    """Seconds spent per pipeline phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


def prune(config: PruneConfig, progress: bool = True) -> dict:
    """Run the pipeline; returns the record also written to `<output>/prune.json`."""
    config.validate()
    if config.method != "fisher" and (config.flops is None or config.has_latency_budget):
        raise UserError(f"--method {config.method} needs --flops and no latency budget (the baselines have no "
                        "latency search)")
    check_output_dir(config.output, config.overwrite)
    resolve_data_dir(config.data_dir)
    task, phases, device = get_task(config.task), Phases(), pick_device(config.device)
    with phases("load"):
        model, tokenizer, path = _load(config, task)
        calib = _calibration(config, task, tokenizer)
    adapter = get_adapter(model.to(device))
    parent_shape = (adapter.num_heads(), adapter.num_filters())
    record = {"model": str(config.model), "source_dir": str(path), "task": task.name}
    if config.has_latency_budget:  # before the Fisher: a wrong table or budget fails fast
        with phases("latency_table"):
            record["latency"] = _latency_budget(config, adapter, calib)
    if config.eval:
        with phases("eval_before"):
            record["eval_before"] = evaluate(model, tokenizer, task, config.data_dir, device, progress=progress)
    heads, filters, flops_model = _masks(config, adapter, model, calib, device, phases, progress, record)
    with phases("slim"):
        from compress.pruning.slim import slim_model

        zero_filters = slim_model(adapter, heads, filters, filter_multiple=config.filter_multiple)
    if config.eval:
        with phases("eval_after"):
            record["eval_after"] = evaluate(model, tokenizer, task, config.data_dir, device, progress=progress)
    record.update(_shape_record(adapter, flops_model, config, phases, parent_shape, zero_filters))
    with atomic_output_dir(config.output, config.overwrite) as tmp:
        checkpoint.save(model.cpu(), tokenizer, tmp, record)
    return record


def _load(config, task):
    path = checkpoint.resolve(config.model)
    model = checkpoint.load(path)
    if model.config.num_labels != task.num_labels:
        raise UserError(f"model {config.model} has {model.config.num_labels} labels but task {task.name} "
                        f"has {task.num_labels}")
    return model, checkpoint.load_tokenizer(path), path


def _calibration(config, task, tokenizer) -> dict:
    if getattr(task, "is_qa", False):  # SQuAD: labelled windows (compress.train.qa)
        from compress.train.qa import calibration
        return calibration(config, task, tokenizer)
    train = load_split(task, "train", config.data_dir)
    n = config.num_samples or task.default_num_samples
    features = batching.encode(tokenizer, calibration_sample(train, n, config.seed),
                               config.max_seq_length or task.max_seq_length)
    pad = batching.pad_id_of(tokenizer)
    return {"batches": list(batching.batches(features, config.batch_size, pad)),
            "seq_len": batching.mean_length(features), "num_samples": len(features)}


def _masks(config, adapter, model, calib, device, phases, progress, record):
    """Search (and for Fisher: rearrange and tune) the masks; fills `record` with what it did."""
    from compress.pruning import baselines, rearrange, tune

    flops_model = cost.flops_model(adapter, calib["seq_len"])
    full = flops_model.flops_counts(adapter.num_heads(), adapter.num_filters())
    if config.method != "fisher":
        with phases("search"):
            scores = (baselines.magnitude_scores(adapter) if config.method == "magnitude"
                      else baselines.random_scores(adapter, config.seed))
            return (*search.uniform_masks(*scores, flops_model.head_cost, flops_model.filter_cost,
                                          config.flops * full), flops_model)
    (heads, filters), (head_grads, filter_grads), before = _fisher_search(config, adapter, model, calib, device,
                                                                          phases, progress, record, flops_model, full)
    if config.rearrange:
        with phases("rearrange"):
            alive_heads, alive_filters = before or (None, None)
            heads = rearrange.rearrange(heads, head_grads, alive_heads, device)
            filters = rearrange.rearrange(filters, filter_grads, alive_filters, device)
    if config.tune:
        with phases("tune"):
            tuner = tune.tune_weights if config.tune_weights else tune.tune_masks
            heads, filters, record["tune"] = tuner(model, adapter, calib["batches"], heads, filters, device,
                                                   config.damp, progress)
    return heads, filters, flops_model


def _fisher_search(config, adapter, model, calib, device, phases, progress, record, flops_model, full):
    """Fisher then search, `search_steps` times down `search.flops_schedule` (and the latency budget
    down the same linear schedule from the dense time), each Fisher taken with the previous step's
    masks applied and each search kept among the units those keep. Returns the masks, the last mask
    gradients and the masks these were taken at (None: all ones); with more than one step,
    `record["steps"]` lists what each step kept."""
    from compress.pruning import fisher

    steps = config.search_steps
    targets = [None] * steps if config.flops is None else search.flops_schedule(config.flops, steps)
    if config.has_latency_budget:
        lat = record["latency"]
        lat["step_budgets_ms"] = [lat["dense_ms"] - (lat["dense_ms"] - lat["budget_ms"]) * i / steps
                                  for i in range(1, steps)] + [lat["budget_ms"]]
    masks = None
    for step, target in enumerate(targets, 1):
        before = masks
        label = f" step {step}/{len(targets)}" if len(targets) > 1 else ""
        with phases("fisher"):
            grads = fisher.mask_gradients(model, adapter, calib["batches"], device, progress, config.fisher,
                                          masks=before, label=label)
        with phases("search"):
            masks = _search(config, flops_model, full, *grads, record, target, before, step)
        if len(targets) > 1:
            record.setdefault("steps", []).append(_step_record(target, *masks))
    return masks, grads, before


def _search(config, flops_model, full, head_grads, filter_grads, record, flops, alive, step=1):
    """Masks at FLOPs fraction `flops` (None: no FLOPs budget) and, if the config has one, under the latency
    budget of search step `step`, among the `alive` units (None: all)."""
    from compress.pruning.fisher import fisher_diagonal

    head_scores, filter_scores = fisher_diagonal(head_grads), fisher_diagonal(filter_grads)
    if not config.has_latency_budget:
        return search.search_flops(head_scores, filter_scores, flops_model.head_cost, flops_model.filter_cost,
                                   flops * full, alive)
    table = cost.LatencyTable.from_dict(record["latency"]["latency_table"])
    budget = record["latency"]["step_budgets_ms"][step - 1] - table.overhead_ms
    both = None if flops is None else (flops_model.head_cost, flops_model.filter_cost, flops * full)
    try:
        heads, filters = search.search_latency(head_scores, filter_scores, table, budget, flops=both, alive=alive,
                                               min_last_heads=int(config.keep_last_head))
    except ValueError as err:
        hint = " (the last layer keeps a head: --no-keep-last-head lifts that)" if config.keep_last_head else ""
        raise UserError(f"latency search: {err}{hint}") from None
    record["latency"]["predicted_ms"] = table.model_ms([int(m.sum()) for m in heads], [int(m.sum()) for m in filters])
    return heads, filters


def _step_record(flops: float, heads, filters) -> dict:
    """What one step of an iterative search kept: its FLOPs target and per-layer counts."""
    return {"flops": flops, "heads": [int(m.sum()) for m in heads], "filters": [int(m.sum()) for m in filters]}


def _latency_budget(config, adapter, calib) -> dict:
    """The latency budget in ms and the table it is measured by: the table of `--latency-table`, or one
    measured now on this device at the calibration length."""
    from compress.pruning import latency

    if config.latency_table is not None:
        table = latency.load_table(config.latency_table)
    else:
        device = next(adapter.model.parameters()).device.type
        seq = max(1, round(calib["seq_len"]))
        trials = 3 if device == "cpu" else 10  # a CPU forward at batch 32 takes seconds; a graph replay, a millisecond
        table = latency.measure_table(adapter.model.config, config.latency_batch_size, seq, device, trials=trials)
    latency.check_table(table, adapter)
    dense_ms = table.meta.get("dense_ms") or table.model_ms(adapter.num_heads(), adapter.num_filters())
    limit = config.latency_ms if config.latency_ms is not None else dense_ms / config.speedup
    if limit <= table.overhead_ms:
        raise UserError(f"a latency budget of {limit:.3f} ms is below the unprunable part of the model "
                        f"({table.overhead_ms:.3f} ms at batch {table.meta.get('batch')})")
    if config.keep_last_head and limit < table.overhead_ms + table.attention_ms[1]:
        raise UserError(f"a latency budget of {limit:.3f} ms leaves no room for the last layer's head "
                        f"({table.overhead_ms + table.attention_ms[1]:.3f} ms with it; --no-keep-last-head lifts that)")
    return {"budget_ms": limit, "dense_ms": dense_ms, "table": config.latency_table or "measured",
            "latency_table": table.to_dict()}


def _shape_record(adapter, flops_model, config, phases, parent_shape, zero_filters) -> dict:
    """FLOPs of the kept units (what the constraint bounds); the zero padding filters are listed apart."""
    heads, filters = adapter.num_heads(), adapter.num_filters()
    before = flops_model.flops_counts(*parent_shape)
    after = flops_model.flops_counts(heads, [f - z for f, z in zip(filters, zero_filters)])
    constraint = {k: getattr(config, k) for k in ("flops", "latency_ms", "speedup") if getattr(config, k) is not None}
    return {"method": config.method, "constraint": constraint, "seq_len": round(flops_model.seq_len, 2),
            "flops_before": before, "flops_after": after, "flops_ratio": after / before,
            "num_attention_heads_per_layer": heads, "intermediate_size_per_layer": filters,
            "zero_filters_per_layer": zero_filters,
            "padded_flops_ratio": flops_model.flops_counts(heads, filters) / before,
            "seconds": dict(phases.seconds, total=round(sum(phases.seconds.values()), 3)),
            "recipe": dataclasses.asdict(config)}


def format_summary(record: dict) -> str:
    """The end-of-run summary: FLOPs kept, per-layer shapes, time per phase, dev metric before/after."""
    recipe = record.get("recipe", {})
    tuned = ("" if record["method"] != "fisher" or not recipe.get("tune", True)
             else ", tuned weights" if recipe.get("tune_weights", True) else ", tuned masks")
    lines = [f"pruned {record['model']} on {record['task']} ({record['method']}, {record['constraint']}{tuned})",
             f"  FLOPs kept: {100 * record['flops_ratio']:.1f}% ({record['flops_after'] / 1e9:.2f} of "
             f"{record['flops_before'] / 1e9:.2f} GFLOPs per example at seq len {record['seq_len']})",
             f"  heads per layer:   {record['num_attention_heads_per_layer']}",
             f"  filters per layer: {record['intermediate_size_per_layer']}"
             + (f" (zero padding: {record['zero_filters_per_layer']})" if any(record.get("zero_filters_per_layer", ())) else ""),
             "  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in record["seconds"].items())]
    if "latency" in record:
        lat = record["latency"]
        meta = lat["latency_table"]["meta"]
        lines.insert(2, f"  latency ({meta.get('device', '?')}, batch {meta.get('batch')} x {meta.get('seq')}, "
                        f"{meta.get('dtype')}): {lat['predicted_ms']:.3f} ms predicted by the table against "
                        f"{lat['dense_ms']:.3f} ms dense ({lat['dense_ms'] / lat['predicted_ms']:.2f}x), "
                        f"budget {lat['budget_ms']:.3f} ms")
    if "steps" in record:
        lines.insert(2, "  search steps: " + "; ".join(f"FLOPs {s['flops']:.3g} -> {sum(s['heads'])} heads, "
                                                        f"{sum(s['filters'])} filters" for s in record["steps"]))
    for key in ("eval_before", "eval_after"):
        if key in record:
            values = ", ".join(f"{k} {v:.2f}" for k, v in record[key].items() if k != "num_examples")
            lines.append(f"  dev {key.split('_')[1]}: {values}")
    return "\n".join(lines)

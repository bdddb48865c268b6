"""The encoder family of the pruning pipeline (BERT, DistilBERT, RoBERTa, MPNet fine-tuned on a task).

What differs from a decoder, stage by stage (compress.pruning.pipeline runs the stages):
- calibrate: `num_samples` labelled training examples of the task (SQuAD: training windows with spans);
- score: the Fisher of the task loss (empirical at the gold labels or under the model's own
  predictions), or the magnitude / random baselines;
- search: FLOPs knapsack (compress.pruning.search), or a latency budget from a per-layer latency table
  (compress.pruning.latency), or both; `search_steps` K > 1 repeats score + search down a schedule, each
  Fisher taken with the masks so far applied and each search among the units still alive. The
  baselines take a uniform keep ratio per layer instead and skip rearrangement and tuning;
- tune: the output projections' kept columns and biases (default) or the paper's per-unit mask scales;
- slim: FFN widths padded with zero filters to `filter_multiple`;
- around it: the dev metric before and after with `eval`.
"""

from __future__ import annotations

from compress.errors import UserError
from compress.pruning import cost, search
from compress.pruning.config import ENCODER


class EncoderFamily:
    name = ENCODER

    def task_name(self, config) -> str:
        from compress.data.tasks import get_task

        return get_task(config.task).name

    def check_inputs(self, config) -> None:
        from compress.data.tasks import get_task, resolve_data_dir

        get_task(config.task)
        resolve_data_dir(config.data_dir)

    def load(self, config, device):
        from compress.data.tasks import get_task
        from compress.models import checkpoint

        task, path = get_task(config.task), checkpoint.resolve(config.model)
        model = checkpoint.load(path)
        if model.config.num_labels != task.num_labels:
            raise UserError(f"model {config.model} has {model.config.num_labels} labels but task {task.name} "
                            f"has {task.num_labels}")
        return model.to(device), checkpoint.load_tokenizer(path), path

    def calibrate(self, config, model, tokenizer, progress: bool):
        from compress.data import batching
        from compress.data.tasks import calibration_sample, get_task, load_split
        from compress.pruning.stages import Calibration

        task = get_task(config.task)
        n = config.num_samples or task.default_num_samples
        if getattr(task, "is_qa", False):  # SQuAD: labelled windows
            from compress.train.qa import calibration_batches, mean_window_length, qa_config

            batches = calibration_batches(task.name, tokenizer, n, config.seed, config.batch_size, config.data_dir,
                                          qa_config(config.max_seq_length), progress)
            return Calibration(batches, mean_window_length(batches), sum(len(b["input_ids"]) for b in batches),
                               f"{task.name} train windows")
        train = load_split(task, "train", config.data_dir)
        features = batching.encode(tokenizer, calibration_sample(train, n, config.seed),
                                   config.max_seq_length or task.max_seq_length)
        batches = list(batching.batches(features, config.batch_size, batching.pad_id_of(tokenizer)))
        return Calibration(batches, batching.mean_length(features), len(features), f"{task.name} train")

    def parent_shape(self, adapter) -> tuple:
        return adapter.num_heads(), adapter.num_filters()

    def cost_model(self, adapter, calib, config):
        return cost.flops_model(adapter, calib.seq_len)

    def before(self, pipe, model, tokenizer, adapter, calib) -> None:
        """The latency budget (before the Fisher: a wrong table or budget fails fast) and the dense metric."""
        config = pipe.config
        if config.has_latency_budget:
            with pipe.phases("latency_table"):
                from compress.pruning.latency import budget

                pipe.record["latency"] = budget(config, adapter, calib.seq_len)
        if config.eval:
            with pipe.phases("eval_before"):
                pipe.record["eval_before"] = self._evaluate(pipe, model, tokenizer)

    def after(self, pipe, model, tokenizer) -> None:
        if pipe.config.eval:
            with pipe.phases("eval_after"):
                pipe.record["eval_after"] = self._evaluate(pipe, model, tokenizer)

    def _evaluate(self, pipe, model, tokenizer) -> dict:
        from compress.data.tasks import get_task
        from compress.train.evaluate import evaluate

        return evaluate(model, tokenizer, get_task(pipe.config.task), pipe.config.data_dir, pipe.device,
                        progress=pipe.progress)

    def targets(self, config) -> list:
        """The FLOPs target of each search step (None: no FLOPs budget); with a latency budget, each step's
        budget goes down the same linear schedule from the dense time (filled in by `search`)."""
        if config.flops is None:
            return [None] * config.search_steps
        return search.flops_schedule(config.flops, config.search_steps)

    def score(self, config, model, adapter, calib, device, masks, progress, record, label=""):
        from compress.pruning import baselines, fisher
        from compress.pruning.stages import Scores

        if config.method == "magnitude":
            return Scores(*baselines.magnitude_scores(adapter))
        if config.method == "random":
            return Scores(*baselines.random_scores(adapter, config.seed))
        grads = fisher.mask_gradients(model, adapter, calib.batches, device, progress, config.fisher, masks=masks,
                                      label=label)
        return Scores(*map(fisher.fisher_diagonal, grads), *grads)

    def search(self, config, scores, cost_model, parent, record, target, alive, step):
        """Masks at FLOPs fraction `target` and, with a latency budget, under that of search step `step`,
        among the `alive` units (None: all)."""
        full = cost_model.flops_counts(*parent)
        if config.method != "fisher":
            return search.uniform_masks(scores.heads, scores.filters, cost_model.head_cost, cost_model.filter_cost,
                                        config.flops * full)
        if not config.has_latency_budget:
            return search.search_flops(scores.heads, scores.filters, cost_model.head_cost, cost_model.filter_cost,
                                       target * full, alive)
        return self._search_latency(config, scores, cost_model, record, target, alive, step, full)

    def _search_latency(self, config, scores, cost_model, record, target, alive, step, full):
        lat, steps = record["latency"], config.search_steps
        if step == 1:
            lat["step_budgets_ms"] = [lat["dense_ms"] - (lat["dense_ms"] - lat["budget_ms"]) * i / steps
                                      for i in range(1, steps)] + [lat["budget_ms"]]
        table = cost.LatencyTable.from_dict(lat["latency_table"])
        both = None if target is None else (cost_model.head_cost, cost_model.filter_cost, target * full)
        try:
            heads, filters = search.search_latency(scores.heads, scores.filters, table,
                                                   lat["step_budgets_ms"][step - 1] - table.overhead_ms, flops=both,
                                                   alive=alive, min_last_heads=int(config.keep_last_head))
        except ValueError as err:
            hint = " (the last layer keeps a head: --no-keep-last-head lifts that)" if config.keep_last_head else ""
            raise UserError(f"latency search: {err}{hint}") from None
        lat["predicted_ms"] = table.model_ms([int(m.sum()) for m in heads], [int(m.sum()) for m in filters])
        return heads, filters

    def rearrange(self, config, masks, scores, parent, alive, device):
        from compress.pruning import rearrange

        alive_heads, alive_filters = alive or (None, None)
        return (rearrange.rearrange(masks[0], scores.head_grads, alive_heads, device),
                rearrange.rearrange(masks[1], scores.filter_grads, alive_filters, device))

    def tunes(self, config) -> bool:
        return config.tune and config.method == "fisher"

    def tune(self, config, model, adapter, calib, masks, device, progress):
        from compress.pruning import tune

        tuner = tune.tune_weights if config.tune_weights else tune.tune_masks
        return tuner(model, adapter, calib.batches, *masks, device, config.damp, progress)

    def filter_multiple(self, config) -> int:
        return config.filter_multiple

    def shape_record(self, adapter, cost_model, parent, zero_filters) -> dict:
        """FLOPs of the kept units (what the constraint bounds); the zero padding filters are listed apart."""
        heads, filters = adapter.num_heads(), adapter.num_filters()
        before = cost_model.flops_counts(*parent)
        return {"seq_len": round(cost_model.seq_len, 2), "flops_before": before,
                "flops_after": cost_model.flops_counts(heads, [f - z for f, z in zip(filters, zero_filters)]),
                "num_attention_heads_per_layer": heads, "intermediate_size_per_layer": filters,
                "zero_filters_per_layer": zero_filters,
                "padded_flops_ratio": cost_model.flops_counts(heads, filters) / before}

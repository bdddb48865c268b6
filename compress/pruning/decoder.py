"""The decoder family of the pruning pipeline (Gemma 2 and Gemma 3, grouped-query attention).

What differs from an encoder, stage by stage (compress.pruning.pipeline runs the stages):
- calibrate: `num_samples` windows of `seq_len` tokens of plain text, each led by BOS
  (compress.data.calib: a file, a directory, bbc-news, the shared Wikipedia sample, or text the model
  samples itself);
- score: the Fisher of the language-modelling loss (compress.pruning.lm_scores); `fisher-group` costs each
  layer's feasible head masks by the Fisher of their exact effect through the post-norm
  (compress.pruning.group_fisher); `fisher-mlp` keeps every head (an ablation). Baselines: magnitude,
  activation norms (FLAP-like), `activation-mlp`. Depth (with `drop_layers`): one score per layer, from
  `block-influence` or `greedy-kl` (compress.pruning.depth);
- search: depth drops `drop_layers` whole layers (least influence, or greedily by KL to the dense model); otherwise
  GQA-aware (compress.pruning.gqa): a layer keeps whole query groups of equal size per KV head,
  under the decoder cost model (compress.pruning.decoder_cost: sliding windows bound attention, the LM
  head is not pruned). Baseline scores, whose scale differs between heads and filters, are made
  comparable first (`_per_flop`);
- rearrange: GQA-shaped, and at most `max_filter_swaps` swaps of filters per layer;
- tune: least-squares tuning of each branch before its post-norm, layer by layer, in fp32
  (compress.pruning.tune_layerwise): one scale per kept unit, or with `--tune-weights` the output
  projections' kept columns. The baselines go through the same search and tuning, so a
  comparison at the same FLOPs isolates the importance criterion.
"""

from __future__ import annotations

from compress.errors import UserError
from compress.pruning.config import DECODER, DEPTH_METHODS


def is_decoder(name_or_dir: str) -> bool:
    """Whether `name_or_dir` names a model of this family (a Gemma 2 or Gemma 3 checkpoint)."""
    from compress.arch.gemma import MODEL_TYPES
    from compress.models import checkpoint

    return checkpoint.read_config(checkpoint.resolve(name_or_dir)).model_type in MODEL_TYPES


def load_decoder(name: str, device, dtype=None, device_map: str | None = None, config=None):
    """The model (eval mode, float32 unless `dtype`), its tokenizer and its local directory. `device_map`
    (with the PruneConfig `config`, whose calibration sizes the placement provisions for): the model spread
    over devices instead of on `device` (compress.pruning.spread)."""
    import torch

    from compress.arch.gemma import MODEL_TYPES, load_causal_lm
    from compress.models import checkpoint

    path = checkpoint.resolve(name)
    model_type = checkpoint.read_config(path).model_type
    if model_type not in MODEL_TYPES:
        raise UserError(f"model type {model_type!r} is not a supported decoder "
                        f"(supported: {', '.join(MODEL_TYPES)})")
    if device_map is not None:
        from compress.pruning.spread import load_spread

        return load_spread(path, dtype or torch.float32, device_map, config), checkpoint.load_tokenizer(path), path
    model = load_causal_lm(path, dtype=dtype or torch.float32).to(device).eval()
    return model, checkpoint.load_tokenizer(path), path


class DecoderFamily:
    name = DECODER

    def task_name(self, config) -> str:
        return "language-modelling"

    def check_inputs(self, config) -> None:
        """A missing or empty calibration file fails now, not after loading the model."""
        from compress.data.calib import NAMED_CORPORA, read_text

        if config.calib and config.calib not in NAMED_CORPORA:
            read_text(config.calib)
        if config.device_map:  # before the model is read
            from compress.pruning.spread import check_present

            check_present(config.device_map)

    def load(self, config, device):
        import torch

        return load_decoder(config.model, device, getattr(torch, config.dtype), config.device_map, config)

    def calibrate(self, config, model, tokenizer, progress: bool):
        import torch

        from compress.data.calib import resolve_calibration
        from compress.pruning.stages import Calibration

        if config.drop_layers:  # too many layers to drop: say so before minutes of calibration text
            from compress.arch import get_adapter
            from compress.pruning.depth import candidates
            candidates(config.drop_layers, self.parent_shape(get_adapter(model)))
        calib = resolve_calibration(model, tokenizer, config.calib, config.data_dir, config.num_samples,
                                    config.seq_len, config.seed)
        ids, size = calib.input_ids, config.batch_size
        batches = [{"input_ids": ids[i:i + size], "attention_mask": torch.ones_like(ids[i:i + size])}
                   for i in range(0, len(ids), size)]
        return Calibration(batches, float(ids.shape[1]), len(ids), calib.source)

    def parent_shape(self, adapter) -> tuple:
        return adapter.num_heads(), adapter.num_kv_heads(), adapter.num_filters()

    def cost_model(self, adapter, calib, config):
        from compress.pruning.decoder_cost import decoder_cost

        return decoder_cost(adapter, config.context_len)

    def before(self, pipe, model, tokenizer, adapter, calib) -> None:
        pass

    def after(self, pipe, model, tokenizer) -> None:
        pass

    def targets(self, config) -> list:
        return [config.flops]

    def score(self, config, model, adapter, calib, device, masks, progress, record, label=""):
        from compress.pruning import baselines, lm_scores
        from compress.pruning.stages import Scores

        if config.method in DEPTH_METHODS:
            from compress.pruning.depth import layer_scores

            layers = layer_scores(config.method, adapter, calib.batches, device, config.drop_layers, progress, record)
            return Scores([layers[i].expand(h) for i, h in enumerate(adapter.num_heads())],
                          [layers[i].expand(f) for i, f in enumerate(adapter.num_filters())], layers=layers)
        if config.method in ("fisher-group", "fisher-width"):
            from compress.pruning.group_fisher import MLP_LEVELS, group_fisher_scores

            *scores, record["calibration_loss"] = group_fisher_scores(
                model, adapter, calib.batches, device, _groups(self.parent_shape(adapter)), progress,
                mlp_levels=MLP_LEVELS if config.method == "fisher-width" else 0)
            return Scores(*scores)
        if config.method.startswith("fisher"):
            head_grads, filter_grads, record["calibration_loss"] = lm_scores.lm_mask_gradients(
                model, adapter, calib.batches, device, progress)
            return Scores([g.pow(2).mean(0) for g in head_grads], [g.pow(2).mean(0) for g in filter_grads],
                          head_grads, filter_grads)
        if config.method == "magnitude":
            return Scores(*baselines.magnitude_scores(adapter))
        return Scores(*lm_scores.activation_scores(model, adapter, calib.batches, device, progress))

    def search(self, config, scores, cost_model, parent, record, target, alive, step):
        """GQA-shaped masks under `target` of the dense non-embedding FLOPs."""
        import torch

        from compress.pruning import gqa

        if config.method in DEPTH_METHODS:
            from compress.pruning.depth import depth_masks, layers_to_drop

            record["dropped_layers"] = layers_to_drop(scores.layers, config.drop_layers, parent)
            return depth_masks(parent, record["dropped_layers"])
        heads, filters = scores.heads, scores.filters
        if scores.head_grads is None:  # a baseline: heads and filters on one scale first
            heads, filters = _per_flop(heads, cost_model.q_cost), _per_flop(filters, cost_model.filter_cost)
        if config.method.endswith("-mlp"):  # the MLP-only variants: every head outranks every filter
            heads = [torch.full_like(h, 1e6 * cost_model.dense_flops()) for h in heads]
        return gqa.search_gqa(heads, filters, cost_model, target * cost_model.dense_flops(), _groups(parent),
                              options=scores.head_options, filter_options=scores.filter_options)

    def rearrange(self, config, masks, scores, parent, alive, device):
        from compress.pruning import gqa
        from compress.pruning.rearrange import block_fisher, rearrange_layer

        heads = masks[0] if scores.head_options else gqa.rearrange_gqa(masks[0], scores.head_grads, _groups(parent))
        filters = [rearrange_layer(m, block_fisher(g), config.max_filter_swaps)
                   for m, g in zip(masks[1], scores.filter_grads)]
        return heads, filters

    def tunes(self, config) -> bool:
        return config.tune

    def tune(self, config, model, adapter, calib, masks, device, progress):
        from compress.pruning.tune_layerwise import tune_layerwise

        return tune_layerwise(model, adapter, calib.batches, *masks, device, config.damp, progress,
                              weights=config.tune_weights)

    def filter_multiple(self, config) -> int:
        return 1

    def shape_record(self, adapter, cost_model, parent, zero_filters) -> dict:
        heads, kv, filters = adapter.num_heads(), adapter.num_kv_heads(), adapter.num_filters()
        return {"context_len": cost_model.context_len, "flops_before": cost_model.flops(*parent),
                "flops_after": cost_model.flops(heads, kv, filters), "lm_head_flops": cost_model.lm_head_flops,
                "num_attention_heads_per_layer": heads, "num_key_value_heads_per_layer": kv,
                "intermediate_size_per_layer": filters}


def _groups(parent) -> list[int]:
    """Query heads per KV head of each layer, from the parent's (heads, kv heads, ...) shape; 1 for a layer
    that already has no heads (nothing to group)."""
    return [h // k if k else 1 for h, k in zip(parent[0], parent[1])]


def _per_flop(scores: list, unit_cost: list[float]) -> list:
    """Scores divided by their kind's mean and multiplied by the unit's FLOPs: a unit of average score is
    worth exactly the FLOPs it costs, whatever its kind, so the search trades heads against filters by
    how far each is above or below its own kind's average."""
    import torch

    mean = torch.cat([s.float() for s in scores]).mean().clamp_min(1e-30)
    return [s.float() / mean * c for s, c in zip(scores, unit_cost)]

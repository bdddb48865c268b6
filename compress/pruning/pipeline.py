"""Post-training pruning of heads and FFN filters (Kwon et al. 2022) for encoders and decoders alike.

calibrate -> score (mask gradients) -> search under a cost model -> rearrange -> tune -> slim -> save.
One `Pipeline` runs these stages in this order for every model; what a stage does for a family lives in
compress.pruning.encoder (task-loss Fisher, FLOPs or latency budgets, weight tuning) and
compress.pruning.decoder (language-modelling Fisher, GQA-shaped search, layer-wise tuning), and for an
encoder pruned for its embeddings without labels in compress.pruning.embedding. Masks travel
between the stages as `(heads, filters)`, lists of per-layer 0/1 (or tuned) tensors; only
compress.arch touches module paths. `search_steps` K > 1 runs score + search K times down a schedule, each
score taken with the masks so far applied and each search kept among the units still alive;
rearrangement and tuning then run once, on the last step's result. The output is written atomically,
with `prune.json` recording how it was made (compress.pruning.summary).
"""

from __future__ import annotations

from compress.arch import get_adapter
from compress.device import pick_device
from compress.models import checkpoint
from compress.models.outputs import atomic_output_dir, check_output_dir
from compress.pruning import spread
from compress.pruning.config import DECODER, EMBEDDING, ENCODER, PruneConfig
from compress.pruning.decoder import DecoderFamily
from compress.pruning.embedding import EmbeddingFamily
from compress.pruning.encoder import EncoderFamily
from compress.pruning.slim import slim_model
from compress.pruning.stages import Calibration, Phases, Scores
from compress.pruning.summary import shape_record

FAMILIES = {ENCODER: EncoderFamily(), DECODER: DecoderFamily()}


def family_of(model: str) -> str:
    """`decoder` for a Gemma 2/3 checkpoint, `encoder` for anything else."""
    from compress.pruning.decoder import is_decoder

    return DECODER if is_decoder(model) else ENCODER


def family_for(config: PruneConfig):
    """What each stage does for this run: the model's family, or an encoder's embedding objective."""
    if config.family == ENCODER and config.objective == EMBEDDING:
        return EmbeddingFamily()
    return FAMILIES[config.family]


class Pipeline:
    """The stages of one pruning run, for the family of `config.model`."""

    def __init__(self, config: PruneConfig, progress: bool = True):
        config.validate()
        self.config = config.for_family(config.family or family_of(config.model))
        self.family = family_for(self.config)
        self.progress, self.phases, self.device = progress, Phases(), pick_device(self.config.device)
        self.record: dict = {}

    def run(self) -> dict:
        """Prune and save; returns the record also written to `<output>/prune.json`."""
        check_output_dir(self.config.output, self.config.overwrite)
        self.family.check_inputs(self.config)
        model, tokenizer = self.prune()
        self.save(model, tokenizer)
        return self.record

    def prune(self):
        """The slimmed model (in memory) and its tokenizer; `self.record` says how. Nothing is written."""
        config, family, phase = self.config, self.family, self.phases
        with phase("load"):
            model, tokenizer, path = family.load(config, self.device)
        if config.device_map:  # spread over devices: inputs enter where the embedding is
            self.device = spread.main_device(model)
        with phase("calibration"):
            calib = family.calibrate(config, model, tokenizer, self.progress)
        adapter = get_adapter(model)
        self.record.update(model=str(config.model), source_dir=str(path), task=family.task_name(config),
                           calibration=calib.source, num_samples=calib.num_samples)
        if config.device_map:
            self.record["placement"] = spread.layer_placement(adapter)
        parent, cost_model = family.parent_shape(adapter), family.cost_model(adapter, calib, config)
        family.before(self, model, tokenizer, adapter, calib)
        heads, filters = self.masks(model, adapter, calib, cost_model, parent)
        with phase("slim"):
            zero_filters = slim_model(adapter, heads, filters, filter_multiple=family.filter_multiple(config))
        family.after(self, model, tokenizer)
        self.record.update(shape_record(config, family.shape_record(adapter, cost_model, parent, zero_filters),
                                        self.phases))
        return model, tokenizer

    def masks(self, model, adapter, calib: Calibration, cost_model, parent, scores: Scores | None = None):
        """score -> search (`search_steps` times) -> rearrange -> tune: the masks to slim by. `scores`
        given (a one-step search): used instead of scoring again, e.g. one Fisher for several budgets."""
        config, family, phase = self.config, self.family, self.phases
        targets, masks, alive = family.targets(config), None, None
        for step, target in enumerate(targets, 1):
            alive = masks
            if scores is None or step > 1:
                label = f" step {step}/{len(targets)}" if len(targets) > 1 else ""
                with phase("fisher" if config.method.startswith("fisher") else "scores"):
                    scores = family.score(config, model, adapter, calib, self.device, alive, self.progress,
                                          self.record, label)
            with phase("search"):
                masks = family.search(config, scores, cost_model, parent, self.record, target, alive, step)
            if len(targets) > 1:
                self.record.setdefault("steps", []).append(_step_record(target, *masks))
        if config.rearrange and scores.head_grads is not None:
            with phase("rearrange"):
                masks = family.rearrange(config, masks, scores, parent, alive, self.device)
        if family.tunes(config):
            with phase("tune"):
                *masks, self.record["tune"] = family.tune(config, model, adapter, calib, masks, self.device,
                                                         self.progress)
        return masks

    def save(self, model, tokenizer) -> None:
        with atomic_output_dir(self.config.output, self.config.overwrite) as tmp:
            checkpoint.save(spread.gathered(model), tokenizer, tmp, self.record, self.record.get("source_dir"))


def prune(config: PruneConfig, progress: bool = True) -> dict:
    """Prune `config.model` into `config.output`; returns the record written to `prune.json`."""
    return Pipeline(config, progress).run()


def _step_record(flops: float, heads, filters) -> dict:
    """What one step of an iterative search kept: its FLOPs target and per-layer counts."""
    return {"flops": flops, "heads": [int(m.sum()) for m in heads], "filters": [int(m.sum()) for m in filters]}

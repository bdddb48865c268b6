"""The settings of `compress prune`, for encoders and decoders alike: one dataclass, validated here.

Fields are grouped by family. Those in the first group apply to both; a field marked `encoder` or
`decoder` applies to that family only, and its default is None ("the family's default", filled in by
`for_family`). Setting a field of the other family is an error, whether it came from a flag, a recipe
or the Python API, so a recipe can never hold a setting that silently does nothing. Precedence:
dataclass defaults < recipe < flags (compress.recipes.resolve). The family comes from the model
(compress.pruning.pipeline): a Gemma 2/3 checkpoint prunes as a decoder with the language-modelling
loss, anything else as an encoder, fine-tuned on `task` (objective `task`) or, with objective `embedding`,
a sentence-embedding model pruned without labels on `calib` text (compress.pruning.embedding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from compress.errors import UserError
from compress.recipes import require_positive

ENCODER, DECODER = "encoder", "decoder"
FAMILIES = (ENCODER, DECODER)
METHODS = {ENCODER: ("fisher", "magnitude", "random"),
           DECODER: ("fisher", "fisher-group", "fisher-width", "fisher-mlp", "magnitude", "activation",
                     "activation-mlp", "block-influence", "greedy-kl")}
DEPTH_METHODS = ("greedy-kl", "block-influence")  # whole layers, with drop_layers instead of flops
# (compress.pruning.depth); the first is the default
FISHERS = ("empirical", "model")  # the Fishers of compress.pruning.fisher.mask_gradients
TASK, EMBEDDING = "task", "embedding"  # encoder objectives: a fine-tuned task's loss, or the pooled embedding
OBJECTIVES = (TASK, EMBEDDING)
DTYPES = ("float32", "bfloat16", "float16")
WHERE = {ENCODER: "an encoder (with --task)", DECODER: "a decoder (without --task)"}
TUNE_WEIGHTS = {ENCODER: True, DECODER: False}  # docs/experiments.md: what each measured
DEFAULT_METHOD = {ENCODER: "fisher", DECODER: "fisher-group"}  # decoders: docs/experiments.md


def _only(family: str, default=None):
    """A field of one family; its default applies once the family is known (None until then)."""
    return field(default=None, metadata={"family": family, "default": default})


@dataclass
class PruneConfig:
    """Everything `compress prune` needs; `compress prune --help` gives the meaning of each field."""

    # both families
    model: str = ""
    output: str = ""
    flops: float | None = None  # fraction of the prunable FLOPs to keep (decoders: non-embedding)
    method: str | None = None  # None: the family's default (DEFAULT_METHOD)
    num_samples: int | None = None  # None: the task's default (encoders) or by device (decoders, calib.SCALE)
    batch_size: int | None = None  # None: 32 (encoders) or by device (decoders)
    seed: int = 0
    rearrange: bool = True
    tune: bool = True
    damp: float = 1.0
    data_dir: str | None = None
    device: str = "auto"
    overwrite: bool = False
    family: str | None = None  # None: from the model's config (compress.pruning.pipeline.family_of)
    calib: str | None = None  # calibration text of a decoder or an embedding objective; None: compress.data.calib's
    tune_weights: bool | None = None  # refit the output projections; False: the paper's masks; None: the
    # family's default (TUNE_WEIGHTS)
    # encoders
    objective: str | None = _only(ENCODER, TASK)  # OBJECTIVES: a task's loss, or label-free distillation
    task: str | None = _only(ENCODER)
    latency_ms: float | None = _only(ENCODER)
    speedup: float | None = _only(ENCODER)  # latency budget = the table's dense time / speedup
    latency_table: str | None = _only(ENCODER)  # a `compress latency-table` JSON; None: measure one here
    latency_batch_size: int | None = _only(ENCODER, 32)
    keep_last_head: bool | None = _only(ENCODER, True)  # latency budgets: the last layer keeps a head
    fisher: str | None = _only(ENCODER, "empirical")  # FISHERS: the loss at the gold label, or the model's own
    search_steps: int | None = _only(ENCODER, 1)  # Fisher + search rounds down to --flops
    max_seq_length: int | None = _only(ENCODER)  # None: the task's default (128 for GLUE, 384 for SQuAD)
    filter_multiple: int | None = _only(ENCODER, 8)  # FFN widths padded with zero filters to a multiple
    eval: bool | None = _only(ENCODER, False)
    distill_steps: int | None = _only(ENCODER)  # --objective embedding: then distil from the parent this many
    # steps (compress.distill.embedding)
    # decoders
    seq_len: int | None = _only(DECODER)  # calibration window in tokens, BOS included; None: by device
    context_len: int | None = _only(DECODER, 2048)  # prefill length of the cost model
    dtype: str | None = _only(DECODER, "float32")
    max_filter_swaps: int | None = _only(DECODER, 128)  # per layer; each swap is O(filters^2)
    drop_layers: int | None = _only(DECODER)  # depth pruning: remove this many whole layers (method DEPTH)
    distill_tokens: int | None = _only(DECODER)  # then distil from the parent this many tokens (compress.distill)
    device_map: str | None = _only(DECODER)  # auto, balanced or a JSON file: spread over GPUs (compress.pruning.spread)

    def __post_init__(self):
        """Once the family is known, its fields' defaults fill what was left unset."""
        if self.family not in FAMILIES:
            return
        for f in dataclasses.fields(self):
            if f.metadata.get("family") == self.family and getattr(self, f.name) is None:
                setattr(self, f.name, f.metadata["default"])
        if self.tune_weights is None:
            self.tune_weights = TUNE_WEIGHTS[self.family]
        if self.method is None:
            self.method = DEPTH_METHODS[0] if self.drop_layers is not None else DEFAULT_METHOD[self.family]
        if self.family == DECODER:  # the calibration scale follows the device (compress.data.calib.SCALE)
            from compress.data.calib import default_scale

            for name, value in default_scale(self.device).items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        if self.batch_size is None:
            self.batch_size = 32

    def for_family(self, family: str) -> PruneConfig:
        """A validated copy bound to `family`: its fields' defaults filled in, the other family's refused."""
        if self.family not in (None, family):
            raise UserError(f"this config is for {self.family}s, not {family}s")
        return dataclasses.replace(self, family=family).validate()

    def validate(self) -> PruneConfig:
        """Checks of both families and, once the family is known, of its own fields (and none of the other's)."""
        if not self.model or not self.output:
            raise UserError("missing required setting: give --model and -o/--output (or recipe keys)")
        if self.flops is not None and not 0.0 < self.flops <= 1.0:
            raise UserError(f"--flops must be in (0, 1], got {self.flops}")
        require_positive(self, "batch_size", "num_samples")
        if self.damp < 0:
            raise UserError(f"damp must be >= 0, got {self.damp}")
        if self.calib is not None and not str(self.calib).strip():
            raise UserError("--calib is empty; give a .txt/.txt.gz file or directory, or omit it")
        if self.family is None:
            return self
        if self.family not in FAMILIES:
            raise UserError(f"unknown model family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        for f in dataclasses.fields(self):
            owner = f.metadata.get("family")
            if owner not in (None, self.family) and getattr(self, f.name) is not None:
                raise UserError(f"--{f.name.replace('_', '-')} applies only to {WHERE[owner]}")
        if self.family == ENCODER:
            self._validate_encoder()
        elif self.family == DECODER:
            self._validate_decoder()
        return self

    def _validate_method(self) -> None:
        if self.method in METHODS[self.family]:
            return
        other = next(f for f in FAMILIES if f != self.family)
        if self.method in METHODS[other]:
            raise UserError(f"--method {self.method} is for {other}s only; {WHERE[self.family].split(' (')[0]} "
                            f"takes {', '.join(METHODS[self.family])}")
        raise UserError(f"unknown --method {self.method!r} for {self.family}s; choose one of "
                        f"{', '.join(METHODS[self.family])}")

    def _validate_encoder(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown --objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.objective == EMBEDDING:
            self._validate_embedding()
        elif not self.task:
            raise UserError("an encoder needs --task: the task it was fine-tuned on (its train split calibrates), "
                            "or --objective embedding (label-free, on text)")
        elif self.distill_steps is not None:
            raise UserError("--distill-steps applies to --objective embedding (a decoder takes --distill-tokens)")
        elif self.calib is not None:
            raise UserError("--calib applies to decoders and to --objective embedding; an encoder pruned for --task "
                            "calibrates on that task's train split")
        if self.flops is None and not self.has_latency_budget:
            raise UserError("give a constraint: --flops F, --latency-ms MS or --speedup S (FLOPs and latency may "
                            "go together)")
        if self.latency_ms is not None and self.speedup is not None:
            raise UserError("give one latency budget: --latency-ms MS or --speedup S, not both")
        for name in ("latency_ms", "speedup"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.latency_table is not None and not self.has_latency_budget:
            raise UserError("--latency-table needs a latency budget (--latency-ms or --speedup)")
        self._validate_method()
        if self.fisher not in FISHERS:
            raise UserError(f"unknown --fisher {self.fisher!r}; choose one of {', '.join(FISHERS)}")
        require_positive(self, "max_seq_length", "latency_batch_size", "filter_multiple")
        steps = self.search_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UserError(f"--search-steps must be an integer >= 1, got {steps!r}")
        if steps > 1 and self.method != "fisher":
            raise UserError(f"--search-steps {steps} needs --method fisher (the baselines search once)")
        if self.method != "fisher" and (self.flops is None or self.has_latency_budget):
            raise UserError(f"--method {self.method} needs --flops and no latency budget (the baselines have no "
                            "latency search)")

    def _validate_embedding(self) -> None:
        require_positive(self, "distill_steps")
        if self.task:
            raise UserError("--objective embedding needs no labels: drop --task (calibrate on text with --calib)")
        if self.method != "fisher":
            raise UserError(f"--objective embedding scores with the Fisher only, not --method {self.method}")

    def _validate_decoder(self) -> None:
        self._validate_method()
        if self.method in DEPTH_METHODS or self.drop_layers is not None:
            self._validate_depth()
        elif self.flops is None:
            raise UserError(f"--flops must be in (0, 1], got {self.flops}")
        require_positive(self, "context_len", "max_filter_swaps", "distill_tokens", "drop_layers")
        if self.seq_len is not None and self.seq_len < 2:
            raise UserError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be {', '.join(DTYPES[:-1])} or {DTYPES[-1]}, got {self.dtype}")
        if self.device_map is not None:
            self._validate_device_map()

    def _validate_depth(self) -> None:
        if self.method not in DEPTH_METHODS:
            raise UserError(f"--drop-layers chooses layers by {' or '.join(DEPTH_METHODS)}, not --method {self.method}")
        if self.drop_layers is None:
            raise UserError(f"--method {self.method} needs --drop-layers N (the number of layers to remove)")
        if self.flops is not None:
            raise UserError("give --drop-layers or --flops, not both (prune the depth-pruned model again for both)")

    def _validate_device_map(self) -> None:
        from compress.pruning.spread import check_spec

        if self.device != "auto":
            raise UserError(f"give --device or --device-map, not both (got --device {self.device}): the map places "
                            "every layer")
        if self.distill_tokens:
            raise UserError("--distill-tokens does not run on a model spread with --device-map; leave one out")
        check_spec(self.device_map)

    @property
    def has_latency_budget(self) -> bool:
        return self.latency_ms is not None or self.speedup is not None

    def settings(self) -> dict:
        """The resolved settings of this family (saved in prune.json): the other family's fields left out."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("family") in (None, self.family)}


def fields_of(family: str | None = None) -> list[str]:
    """Names of the settings of `family` (None: every field); what a CLI maps its flags onto."""
    return [f.name for f in dataclasses.fields(PruneConfig) if family is None or f.metadata.get("family") in (None, family)]

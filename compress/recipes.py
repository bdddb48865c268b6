"""Configuration of the encoder pruner and the fine-tuner: one dataclass each, plus YAML recipes.

A recipe (recipes/*.yaml) maps one-to-one onto the fields of `PruneConfig` or `FinetuneConfig`;
unknown keys are an error. Precedence: dataclass defaults < recipe < command-line flags given
explicitly (argparse defaults are `None`, meaning "not given"). The resolved config is written to
`prune.json` next to the pruned model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import UserError

METHODS = ("fisher", "magnitude", "random")
FISHERS = ("empirical", "model")  # the Fishers of compress.pruning.fisher.mask_gradients


@dataclass
class PruneConfig:
    """Everything `compress prune` needs; see `compress prune --help` for the meaning of each field."""

    model: str = ""
    task: str = ""
    output: str = ""
    flops: float | None = None
    latency_ms: float | None = None
    speedup: float | None = None  # latency budget = the table's dense time / speedup
    latency_table: str | None = None  # a `compress latency-table` JSON; None: measure one on this device
    keep_last_head: bool = True  # latency budgets: the last layer keeps a head (an empty last layer collapses)
    method: str = "fisher"
    fisher: str = "empirical"  # FISHERS: the loss at the gold label, or the model's own predictions
    search_steps: int = 1  # Fisher + search rounds down to --flops, each with the previous masks applied
    num_samples: int | None = None  # None: the task's default (2048 for GLUE)
    seed: int = 0
    max_seq_length: int | None = None  # None: the task's default (128 for GLUE, 384 for SQuAD)
    batch_size: int = 32
    rearrange: bool = True
    tune: bool = True
    tune_weights: bool = True  # tune the output projections' kept columns and biases; False: the paper's masks
    damp: float = 1.0
    filter_multiple: int = 8  # FFN widths padded with zero filters to a multiple of this (1: no padding)
    latency_batch_size: int = 32
    data_dir: str | None = None
    device: str = "auto"
    eval: bool = False
    overwrite: bool = False

    def validate(self) -> "PruneConfig":
        _require_str(self, "model", "task", "output")
        if self.flops is None and self.latency_ms is None and self.speedup is None:
            raise UserError("give a constraint: --flops F, --latency-ms MS or --speedup S (FLOPs and latency may "
                            "go together)")
        if self.latency_ms is not None and self.speedup is not None:
            raise UserError("give one latency budget: --latency-ms MS or --speedup S, not both")
        if self.flops is not None and not 0.0 < self.flops <= 1.0:
            raise UserError(f"--flops must be in (0, 1], got {self.flops}")
        if self.latency_ms is not None and not self.latency_ms > 0:
            raise UserError(f"--latency-ms must be positive, got {self.latency_ms}")
        if self.speedup is not None and not self.speedup > 0:
            raise UserError(f"--speedup must be positive, got {self.speedup}")
        if self.latency_table is not None and not self.has_latency_budget:
            raise UserError("--latency-table needs a latency budget (--latency-ms or --speedup)")
        if self.method not in METHODS:
            raise UserError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.fisher not in FISHERS:
            raise UserError(f"unknown --fisher {self.fisher!r}; choose one of {', '.join(FISHERS)}")
        _require_positive(self, "max_seq_length", "batch_size", "latency_batch_size", "filter_multiple")
        self._validate_search_steps()
        if self.num_samples is not None and self.num_samples < 1:
            raise UserError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.damp < 0:
            raise UserError(f"damp must be >= 0, got {self.damp}")
        return self

    def _validate_search_steps(self) -> None:
        steps = self.search_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UserError(f"--search-steps must be an integer >= 1, got {steps!r}")
        if steps > 1 and self.method != "fisher":
            raise UserError(f"--search-steps {steps} needs --method fisher (the baselines search once)")

    @property
    def has_latency_budget(self) -> bool:
        return self.latency_ms is not None or self.speedup is not None


@dataclass
class FinetuneConfig:
    """Everything `compress finetune` needs."""

    model: str = ""
    task: str = ""
    output: str = ""
    epochs: float | None = None  # None: the task's default
    max_steps: int | None = None
    learning_rate: float | None = None  # None: the task's default (5e-5 for GLUE)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    batch_size: int = 32
    max_seq_length: int | None = None  # None: the task's default (128 for GLUE, 384 for SQuAD)
    seed: int = 0
    data_dir: str | None = None
    device: str = "auto"
    overwrite: bool = False

    def validate(self) -> "FinetuneConfig":
        _require_str(self, "model", "task", "output")
        _require_positive(self, "batch_size", "max_seq_length")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        return self


def _require_str(config, *names: str) -> None:
    for name in names:
        if not getattr(config, name):
            raise UserError(f"missing required setting {name!r} (flag --{name.replace('_', '-')} or recipe key)")


def _require_positive(config, *names: str) -> None:
    """Each named setting, when set (None means "the default"), is at least 1."""
    for name in names:
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UserError(f"{name} must be at least 1, got {getattr(config, name)}")


def load_recipe(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML recipe into a dict (empty when no path)."""
    if path is None:
        return {}
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of setting: value")
    return data


def resolve(cls, recipe: dict[str, Any] | None = None, **overrides):
    """Build a `cls` config from defaults, then the recipe, then the non-None overrides."""
    known = {f.name for f in dataclasses.fields(cls)}
    values = dict(recipe or {})
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown recipe key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    values.update({k: v for k, v in overrides.items() if v is not None and k in known})
    return cls(**values).validate()

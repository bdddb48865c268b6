"""The token pruner's settings (`compress token-prune` flags map one-to-one onto these fields)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from compress.errors import UserError


@dataclass
class TokenPruningConfig:
    model: str = ""
    task: str = ""
    output: str = ""
    rule: str = "threshold"  # "threshold" = learned token pruning; "topk" = fixed-ratio baseline
    mask_lambda: float = 0.1  # weight of the mean-mask (FLOPs proxy) term; the paper uses 0.01-0.2
    temperature: float = 1e-3  # of the soft mask sigmoid((importance - threshold) / T)
    final_threshold: float = 0.01  # initial threshold of the last pruning layer; earlier ones rise to it
    keep_rate: float = 0.5  # topk only: keep ratio after the last pruning layer (1.0 after the first)
    soft_epochs: float = 3.0
    hard_epochs: float = 2.0
    max_steps: int | None = None  # per stage, overrides epochs when set (quick runs)
    learning_rate: float = 2e-5
    threshold_learning_rate: float = 2e-4  # thresholds live around 1/sequence length, hence small
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    batch_size: int = 32
    max_seq_length: int = 128
    seed: int = 0
    data_dir: str | None = None
    device: str = "auto"
    overwrite: bool = False

    def validate(self) -> "TokenPruningConfig":
        for name in ("model", "task", "output"):
            _check(bool(getattr(self, name)), f"missing required setting {name!r} (flag --{name} or recipe key)")
        _check(self.rule in ("threshold", "topk"), f"rule must be 'threshold' or 'topk', got {self.rule!r}")
        _check(_finite(self.mask_lambda) and self.mask_lambda >= 0, f"--lambda must be >= 0, got {self.mask_lambda}")
        _check(_finite(self.temperature) and self.temperature > 0, f"--temperature must be > 0, got {self.temperature}")
        _check(_finite(self.final_threshold) and 0 <= self.final_threshold < 1,
               f"--final-threshold must be in [0, 1) (importances are probabilities), got {self.final_threshold}")
        _check(0 < self.keep_rate <= 1, f"keep rate must be in (0, 1], got {self.keep_rate}")
        for name in ("soft_epochs", "hard_epochs"):
            value = getattr(self, name)
            _check(_finite(value) and value >= 0, f"--{name.replace('_', '-')} must be >= 0, got {value}")
        _check(self.max_steps is None or self.max_steps >= 0, f"max steps must be >= 0, got {self.max_steps}")
        _check(self.learning_rate > 0 and self.threshold_learning_rate > 0, "learning rates must be > 0")
        _check(self.batch_size > 0 and self.max_seq_length > 1, "batch size and max sequence length must be > 0")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def initial_thresholds(final_threshold: float, num_layers: int) -> list[float]:
    """Thresholds after layers 0..L-2, rising linearly with depth up to `final_threshold`."""
    steps = num_layers - 1
    return [final_threshold * (i + 1) / steps for i in range(steps)]


def topk_keep_ratios(keep_rate: float, num_layers: int) -> list[float]:
    """The top-k baseline's schedule: keep everything after layer 0, falling linearly to `keep_rate`."""
    steps = num_layers - 1
    if steps == 1:
        return [keep_rate]
    return [1.0 - (1.0 - keep_rate) * i / (steps - 1) for i in range(steps)]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)

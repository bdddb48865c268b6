"""The settings of `compress finetune`: one dataclass, filled from defaults, a recipe, then flags
(compress.recipes.resolve), validated here and saved in the output's finetune.json."""

from __future__ import annotations

from dataclasses import dataclass

from compress.recipes import require_positive, require_str
from compress.errors import UserError


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
        require_str(self, "model", "task", "output")
        require_positive(self, "batch_size", "max_seq_length")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        return self

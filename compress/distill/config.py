"""The settings of `compress distill` (and of `compress prune --distill-tokens`): one dataclass, validated here.

Fields left None take a default by device (`SCALE`): a GPU run is sized for minutes on one H100, a CPU run
for a smoke test. Precedence as everywhere: dataclass defaults < recipe < flags (compress.recipes.resolve).
The resolved settings are saved in the output's `distill.json`; `--resume` refuses a checkpoint made with
different training settings (`TRAINING_FIELDS`), so a resumed run is the run it continues.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compress.errors import UserError
from compress.recipes import require_positive

# By device. GPU: 16 x 1024 tokens a step (bf16); CPU: tiny, only to show the loop runs.
SCALE = {"cuda": {"tokens": 10_000_000, "seq_len": 1024, "batch_size": 16, "eval_windows": 32, "evals": 10},
         "cpu": {"tokens": 16_384, "seq_len": 128, "batch_size": 2, "eval_windows": 4, "evals": 2}}
TRAINING_FIELDS = ("tokens", "seq_len", "batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay",
                   "max_grad_norm", "seed", "calib", "sample", "train_embeddings")


def fill_by_device(config, scale: dict) -> None:
    """Set the fields of `config` left None from `scale["cuda"]` or `scale["cpu"]`, by the device it runs on."""
    from compress.device import pick_device

    for name, value in scale["cuda" if pick_device(config.device).type == "cuda" else "cpu"].items():
        if getattr(config, name) is None:
            setattr(config, name, value)


@dataclass
class DistillConfig:
    """Everything `compress distill` needs; `compress distill --help` gives the meaning of each field."""

    student: str = ""
    teacher: str = ""
    output: str = ""
    tokens: int | None = None  # training tokens (positions whose teacher distribution is matched)
    calib: str | None = None  # training text; None: compress.data.calib's default (Wikipedia head, else samples)
    data_dir: str | None = None
    seq_len: int | None = None  # window in tokens, BOS included
    batch_size: int | None = None  # windows per step
    lr: float = 1e-4  # peak AdamW learning rate (linear warmup, cosine decay to min_lr_ratio * lr)
    min_lr_ratio: float = 0.1
    warmup: float = 0.1  # fraction of the steps (at least one when above 0)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    evals: int | None = None  # held-out evaluations per run after the one before training
    eval_every: int | None = None  # steps between held-out evaluations; None: from `evals`
    eval_windows: int | None = None  # held-out windows, cut from the end of the training text
    save_every: int | None = None  # steps between checkpoints; None: every `save_minutes`
    save_minutes: float = 10.0
    sample: bool = True  # fill a short text with text the teacher samples (up to as much again as the text)
    train_embeddings: bool = False  # the (tied) embedding stays the teacher's by default
    activation_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        fill_by_device(self, SCALE)

    def validate(self) -> "DistillConfig":
        if not self.student or not self.teacher or not self.output:
            raise UserError("give the student, --teacher PARENT and -o/--output DIR")
        require_positive(self, "tokens", "batch_size", "eval_windows", "evals", "eval_every", "save_every")
        if self.seq_len < 2:
            raise UserError(f"--seq-len must be at least 2, got {self.seq_len}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.warmup < 1:
            raise UserError(f"need --lr > 0, --min-lr-ratio in [0, 1] and --warmup in [0, 1); got {self.lr}, "
                            f"{self.min_lr_ratio}, {self.warmup}")
        if self.weight_decay < 0 or not self.max_grad_norm > 0 or self.save_minutes < 0:
            raise UserError("--weight-decay and --save-minutes must be >= 0 and --max-grad-norm > 0")
        if self.calib is not None and not str(self.calib).strip():
            raise UserError("--calib is empty; give a .txt/.txt.gz file or directory, or omit it")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def num_steps(self) -> int:
        return -(-self.tokens // self.tokens_per_step)

    def training_settings(self) -> dict:
        return {name: getattr(self, name) for name in TRAINING_FIELDS}

    def settings(self) -> dict:
        return dataclasses.asdict(self)

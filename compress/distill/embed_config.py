"""The settings of `compress distill` for a sentence-embedding encoder (and of `compress prune --objective
embedding --distill-steps`): one dataclass, validated here.

The student is a slimmed encoder (a sentence-transformers directory or a bare encoder), the teacher the dense
model it was pruned from; both pool as the student's directory says. Fields left None take a default by
device (`SCALE`). Precedence as everywhere: dataclass defaults < recipe < flags. The resolved settings are
saved in the output's `distill.json`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compress.distill.config import fill_by_device
from compress.errors import UserError
from compress.recipes import require_positive

SCALE = {"cuda": {"steps": 2000, "batch_size": 64}, "cpu": {"steps": 1000, "batch_size": 32}}
HELDOUT_PASSAGES = 128  # a second seeded draw of passages: the held-out loss reported before and after


@dataclass
class EmbedDistillConfig:
    """Everything the embedding distillation needs; `compress distill --help` gives the meaning of each field."""

    student: str = ""
    teacher: str = ""
    output: str = ""
    steps: int | None = None  # optimizer steps, each on `batch_size` fresh passages
    batch_size: int | None = None  # passages per step (also the size of the in-batch similarity matrix)
    max_seq_length: int = 128  # passages cut to this many tokens (or the model's limit)
    calib: str | None = None  # training text; None: compress.embeddings.calib's default (Wikipedia head, else BBC)
    data_dir: str | None = None
    lr: float = 1e-4  # peak AdamW learning rate (linear warm-up, then linear decay to 0)
    warmup: float = 0.1  # fraction of the steps
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    relational: float = 1.0  # weight of the in-batch similarity loss beside the embedding MSE
    train_embeddings: bool = False  # the token embeddings stay the teacher's (the pruner never changes them)
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self):
        fill_by_device(self, SCALE)

    def validate(self) -> EmbedDistillConfig:
        if not self.student or not self.teacher or not self.output:
            raise UserError("give the student, --teacher PARENT and -o/--output DIR")
        require_positive(self, "steps", "max_seq_length")
        if self.batch_size < 2:
            raise UserError(f"--batch-size must be at least 2 (the relational loss compares passages within a "
                            f"batch), got {self.batch_size}")
        if not self.lr > 0 or not 0 <= self.warmup < 1:
            raise UserError(f"need --lr > 0 and --warmup in [0, 1); got {self.lr}, {self.warmup}")
        if self.weight_decay < 0 or not self.max_grad_norm > 0 or self.relational < 0:
            raise UserError("--weight-decay and --relational must be >= 0 and --max-grad-norm > 0")
        if self.calib is not None and not str(self.calib).strip():
            raise UserError("--calib is empty; give a .txt/.txt.gz file or directory, or omit it")
        return self

    def settings(self) -> dict:
        return dataclasses.asdict(self)

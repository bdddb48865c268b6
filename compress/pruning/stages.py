"""What the stages of the pruning pipeline hand each other (compress.pruning.pipeline), and their timer."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch


@dataclass
class Calibration:
    batches: list[dict]  # model inputs (and labels) of `batch_size` examples each
    seq_len: float  # mean tokens per example: the encoder cost model's sequence length
    num_samples: int
    source: str  # where the examples came from, for the record


@dataclass
class Scores:
    heads: list[torch.Tensor]  # per layer [H]: importance of each head (higher: keep)
    filters: list[torch.Tensor]  # per layer [F]
    head_grads: list[torch.Tensor] | None = None  # per layer [N, H]: per-example mask gradients (Fisher only)
    filter_grads: list[torch.Tensor] | None = None
    head_options: list | None = None  # per layer: (heads, kv heads, value, mask [H]) for the GQA search (fisher-group)
    filter_options: list | None = None  # per layer: (filters, value, mask [F]) (fisher-width)
    layers: torch.Tensor | None = None  # [L]: importance of each whole layer (depth pruning, block-influence)


class Phases:
    """Seconds spent per pipeline phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)

"""The one place that turns a `--device` value into a torch device, and the precision used on it.

`auto` is CUDA when present, else the CPU. On CUDA, evaluation and fine-tuning forwards run under bf16
autocast (enough for argmax and correlations, and faster); on the CPU they stay in exact fp32.
"""

from __future__ import annotations

import contextlib

import torch


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on GPU; exact fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()

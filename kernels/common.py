"""Small Triton helpers shared by the attention kernels, launch-time facts about the device, and the
ticket counters of the one-launch reductions (split-K GEMV, split-KV decode).

`tanh` is written with exp2 because triton 3.6 and 3.9 expose different libdevice paths
(`tl.extra.cuda.libdevice` moved) and the interpreter has none; exp2 exists everywhere.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def tanh(x):
    # 1 - 2 / (e^{2x} + 1): saturates to +-1 without NaN when exp2 overflows to inf or underflows to 0
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def scores_to_log2(s, qk_scale, softcap, USE_SOFTCAP: tl.constexpr):
    """Raw q.k [M, N] fp32 -> scaled (and soft-capped) scores in log2 units, ready for exp2."""
    if USE_SOFTCAP:
        s = softcap * tanh(s * (qk_scale / softcap))
        return s * 1.4426950408889634
    return s * (qk_scale * 1.4426950408889634)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast dot operands to fp32: the triton 3.9 interpreter gets bf16 dots wrong."""
    return interpreting() and dtype == torch.bfloat16


@lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(tensor: torch.Tensor) -> int:
    return num_sms(tensor.device.index or 0) if tensor.is_cuda else 8


MAX_TICKETS = 1 << 16
_tickets: dict[torch.device, torch.Tensor] = {}


def ticket_counters(device: torch.device) -> torch.Tensor:
    """The device's persistent int32 ticket counters for one-launch reductions (the last program of a
    group merges its partials and resets the group's counter to 0). Allocated once and never
    reallocated, so captured CUDA graphs keep pointing at it; shared by every such kernel in stream
    order, so two must not run concurrently on different streams."""
    if device not in _tickets:
        _tickets[device] = torch.zeros(MAX_TICKETS, dtype=torch.int32, device=device)
    return _tickets[device]


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))

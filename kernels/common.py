"""Small Triton helpers shared by the attention kernels, launch-time facts about the device, the
ticket counters of the one-launch reductions (split-K GEMV), and the switch and in-kernel calls of
Programmatic Dependent Launch (PDL) for the decode-step kernels (its option: kernels/options.py).

`tanh` is written with exp2 because triton 3.6 and 3.9 expose different libdevice paths
(`tl.extra.cuda.libdevice` moved) and the interpreter has none; exp2 exists everywhere.

PDL (sm90+, docs/kernels.md "PDL"): a kernel launched with `launch_pdl=True` may start while the
previous kernel on the stream drains. Each such kernel takes `USE_PDL: tl.constexpr` and calls
`pdl_wait(USE_PDL)` at its top level, before its first load of anything the kernel just before it may
have written and before its first store. What may be loaded before it: weights and other constants of
the model; the step's metadata (positions, slots, seq_lens, block tables), copied in before the step's
first kernel and written by none; and data written two or more kernels back, which the caller must
declare (rms_norm_pair's `residual_settled`). The last is safe because a PDL kernel starts only after
every program of the kernel before it has passed its own wait, i.e. after the one before that has
completed and flushed its writes; such loads go to L2 (`.cg`). Both
triton 3.6 and 3.9 have `launch_pdl` and `tl.extra.cuda.gdc_wait`; the interpreter has neither, which
is why the call sits behind the constexpr and `pdl_enabled` is False there.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .options import kernel_options

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


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Under PDL: wait until the previous grid has completed and its writes are visible, then let the
    next grid launch. Releasing right after the wait (not after the main loop) gives the next kernel
    the most time to launch and prefetch its weights; it still waits for this whole grid, so this grid
    and one waiting dependent are the most that are resident at once."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def triton_supports_pdl() -> bool:
    """Whether this triton launches with `launch_pdl` and has the in-kernel GDC calls (3.6 and 3.9 do)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and hasattr(tl.extra.cuda, "gdc_wait")


@lru_cache(maxsize=None)
def device_supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9 and triton_supports_pdl()


# PDL pays where a step is a chain of short launches (batch-1 decode: 2.62 -> 2.47 ms per Gemma-2-2B
# step on the H100) and costs where grids are large: with it on for every launch, the 256-request
# offline run lost 1.4% of its throughput (docs/kernels.md "PDL"). So it is on for small launches only.
PDL_MAX_ROWS = 8


def pdl_enabled(device: torch.device, rows: int) -> bool:
    """Whether a decode-step kernel over `rows` tokens (or sequences) on `device` launches with PDL: on
    CUDA with compute capability >= 9 and a triton that has it, for at most PDL_MAX_ROWS rows; never on
    CPU or under the interpreter. `set_options(pdl=False)` turns it off (A/B, or a driver or graph
    capture that mishandles it); `pdl=True` insists (an error where it cannot be on). Read at every
    launch: a CUDA graph keeps what was set when it was captured."""
    forced = kernel_options().pdl
    if interpreting() or device.type != "cuda" or forced is False or rows > PDL_MAX_ROWS:
        return False
    supported = device_supports_pdl(device.index if device.index is not None else torch.cuda.current_device())
    if forced and not supported:
        raise ValueError("pdl=True needs compute capability >= 9.0 and a triton with launch_pdl")
    return supported


def pdl_launch(device: torch.device, rows: int) -> dict:
    """The launch arguments of a PDL-capable kernel over `rows` rows: its `USE_PDL` constexpr and, only
    when that is on, `launch_pdl` (so a triton without it never sees it). One dict for both, because
    they must agree: a PDL launch of a kernel compiled without the wait would race its predecessor."""
    pdl = pdl_enabled(device, rows)
    return {"USE_PDL": True, "launch_pdl": True} if pdl else {"USE_PDL": False}


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


def as_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """t as [rows, hidden] with a contiguous last dimension (a view where possible)."""
    t2 = t.reshape(-1, hidden)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()

"""The kernels' A/B options: Programmatic Dependent Launch, the batch-1 logits in one launch, and the
decode attention launch config. Set once through `set_options` (benchmarks and tests flip them with
`using_options`); the launchers read them from a module global at every launch, so a CUDA graph keeps the
options it was captured with: re-capture after a change (serve/cuda_graphs.py `DecodeGraphs.capture`).
The backend is chosen apart (kernels/dispatch.py `set_backend`, env KERNELS_BACKEND); no other option
comes from the environment. Plain Python: kernels/dispatch.py reads it without importing triton.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode attention split kernel (kernels/decode.py)."""
    block_n: int              # context tokens per tile: a power of two >= 16 (the matrix unit's minimum)
    num_warps: int            # a power of two, 1 to 32
    num_stages: int           # software-pipeline depth, >= 1
    programs_per_sm: float    # split programs per SM the split count aims for, > 0

    def __post_init__(self):
        ints = {"block_n": self.block_n, "num_warps": self.num_warps, "num_stages": self.num_stages}
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"decode_config.{name} must be an int, got {value!r}")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"decode_config.block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"decode_config.num_warps must be a power of two from 1 to 32, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"decode_config.num_stages must be >= 1, got {self.num_stages}")
        per_sm = self.programs_per_sm
        if isinstance(per_sm, bool) or not isinstance(per_sm, (int, float)) or not per_sm > 0:
            raise ValueError(f"decode_config.programs_per_sm must be a number > 0, got {per_sm!r}")


def parse_decode_config(text: str) -> DecodeConfig:
    """A benchmark's --decode-config, "block_n,num_warps,num_stages,programs_per_sm", as a DecodeConfig."""
    parts = text.split(",")
    if len(parts) != 4:
        raise ValueError(f"a decode config is block_n,num_warps,num_stages,programs_per_sm, got {text!r}")
    block_n, warps, stages, per_sm = parts
    return DecodeConfig(int(block_n), int(warps), int(stages), float(per_sm))


@dataclass(frozen=True)
class KernelOptions:
    """The options in force; each launch reads them, so a captured CUDA graph keeps those of its capture."""
    # PDL of the small decode-step launches (kernels/common.py pdl_enabled): None on where the device and
    # triton support it, False off (A/B, or a driver or graph capture that mishandles it), True insists
    # (a small launch that cannot use it raises).
    pdl: bool | None = None
    # batch-1 logits, fp32 cast and soft-cap in one launch (kernels.logits_small_m); False: four launches
    fused_logits: bool = True
    # None: the tuned configs (kernels/decode.py, one for batch 1, one for more); else this one for all
    decode_config: DecodeConfig | None = None

    def __post_init__(self):
        if not isinstance(self.pdl, (bool, type(None))):
            raise ValueError(f"pdl must be None (auto), False (off) or True (insist), got {self.pdl!r}")
        if not isinstance(self.fused_logits, bool):
            raise ValueError(f"fused_logits must be True or False, got {self.fused_logits!r}")
        if isinstance(self.decode_config, Mapping):
            object.__setattr__(self, "decode_config", _decode_config_from(self.decode_config))
        if not isinstance(self.decode_config, (DecodeConfig, type(None))):
            raise ValueError(f"decode_config must be None, a DecodeConfig or a dict of its fields, "
                             f"got {self.decode_config!r}")


def _decode_config_from(mapping: Mapping) -> DecodeConfig:
    names = {f.name for f in fields(DecodeConfig)}
    if set(mapping) != names:
        raise ValueError(f"decode_config needs exactly the keys {sorted(names)}, got {sorted(mapping)}")
    return DecodeConfig(**mapping)


_options = KernelOptions()


def kernel_options() -> KernelOptions:
    """The options in force (cheap: a module global, read at every launch)."""
    return _options


def set_options(**changes) -> KernelOptions:
    """Change the named options (fields of KernelOptions), keep the others; returns the new options.
    Raises ValueError, changing nothing, on an unknown name or an invalid value."""
    global _options
    names = {f.name for f in fields(KernelOptions)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"unknown kernel option(s) {unknown}; the options are {sorted(names)}")
    _options = replace(_options, **changes)
    return _options


@contextmanager
def using_options(**changes) -> Iterator[KernelOptions]:
    """set_options(**changes) inside the block; the options before it are back after, also on error."""
    global _options
    before = _options
    try:
        yield set_options(**changes)
    finally:
        _options = before

"""The attention backend interface over the paged KV layout, and the backends behind it.

Shapes (the kernel contract of kernels/): paged cache per layer `[num_blocks, block_size, Hkv, D]`;
`q [T, Hq, D]` packs every sequence's new tokens; `cu_seqlens_q [B+1]`, `seq_lens [B]` (context length
including the new tokens), `block_tables [B, M]` with -1 for sliding-window blocks already freed.
The backend is chosen once (`select_backend`): `reference` is the plain-torch twin in kernels/reference.py
and runs anywhere (CPU); `triton` plugs in the kernels of kernels/ with the same signatures.
Metadata travels explicitly with each call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GroupMetadata:
    """Per KV group (full attention, or one sliding window): where each new token's K/V goes."""
    slot_mapping: torch.Tensor     # [T] int64 (int32 in the decode graphs), -1 = skip
    block_tables: torch.Tensor     # [B, M] int32


@dataclass
class AttentionMetadata:
    cu_seqlens_q: torch.Tensor     # [B+1] int32
    seq_lens: torch.Tensor         # [B] int32
    max_seqlen_q: int
    is_decode: bool                # every sequence has exactly one new token
    groups: dict = field(default_factory=dict)   # group key (None or window) -> GroupMetadata


class AttentionBackend:
    """One API over three ops; subclasses bind them to an implementation."""

    name = "abstract"

    def reshape_and_cache(self, key, value, k_cache, v_cache, slot_mapping):
        raise NotImplementedError

    def paged_prefill_attention(self, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, **kw):
        raise NotImplementedError

    def paged_decode_attention(self, q, k_cache, v_cache, block_tables, seq_lens, **kw):
        raise NotImplementedError

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, group_key, *,
                scale: float, sliding_window: int | None, softcap: float | None,
                kv_written: bool = False) -> torch.Tensor:
        """Write this step's k, v [T, Hkv, D] into the cache, then attend q [T, Hq, D] -> [T, Hq, D].

        kv_written: the model already stored k and v at the group's slot_mapping (kernels.rotary_and_cache
        on the fast path); k and v are then ignored and may be None."""
        group = meta.groups[group_key]
        if not kv_written:
            self.reshape_and_cache(k, v, k_cache, v_cache, group.slot_mapping)
        kw = dict(scale=scale, sliding_window=sliding_window, softcap=softcap)
        if meta.is_decode:
            return self.paged_decode_attention(q, k_cache, v_cache, group.block_tables, meta.seq_lens, **kw)
        return self.paged_prefill_attention(q, k_cache, v_cache, group.block_tables, meta.cu_seqlens_q,
                                            meta.seq_lens, max_seqlen_q=meta.max_seqlen_q, **kw)


class KernelBackend(AttentionBackend):
    """The ops of one kernels/ backend: `reference` (plain torch, any device) or `triton`."""

    def __init__(self, name: str):
        from compress.kernels.dispatch import load_backend
        ops = load_backend(name)
        self.name = name
        self.reshape_and_cache = ops.reshape_and_cache
        self.paged_prefill_attention = ops.paged_prefill_attention
        self.paged_decode_attention = ops.paged_decode_attention


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        from compress.kernels.dispatch import load_backend  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(name: str, device: torch.device) -> AttentionBackend:
    """Pick once: `auto` is triton on CUDA when the kernels import, else the torch reference."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "reference"
    if name == "triton":
        if not triton_available():
            raise ValueError("attention backend 'triton' needs triton and the kernels package")
        return KernelBackend("triton")
    return KernelBackend("reference")

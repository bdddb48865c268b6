"""The attention backend interface and its plain-torch reference on the paged KV layout.

Shapes (see the team brief's kernel contract): paged cache per layer `[num_blocks, block_size, Hkv, D]`;
`q [T, Hq, D]` packs every sequence's new tokens; `cu_seqlens_q [B+1]`, `seq_lens [B]` (context length
including the new tokens), `block_tables [B, M]` with -1 for sliding-window blocks already freed.
The backend is chosen once (`select_backend`): `reference` runs anywhere (CPU), `triton` plugs in the
kernels of kernels/ with the same signatures. Metadata travels explicitly with each call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GroupMetadata:
    """Per KV group (full attention, or one sliding window): where each new token's K/V goes."""
    slot_mapping: torch.Tensor     # [T] int64, -1 = skip
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
                scale: float, sliding_window: int | None, softcap: float | None) -> torch.Tensor:
        """Write this step's k, v [T, Hkv, D] into the cache, then attend q [T, Hq, D] -> [T, Hq, D]."""
        group = meta.groups[group_key]
        self.reshape_and_cache(k, v, k_cache, v_cache, group.slot_mapping)
        kw = dict(scale=scale, sliding_window=sliding_window, softcap=softcap)
        if meta.is_decode:
            return self.paged_decode_attention(q, k_cache, v_cache, group.block_tables, meta.seq_lens, **kw)
        return self.paged_prefill_attention(q, k_cache, v_cache, group.block_tables, meta.cu_seqlens_q,
                                            meta.seq_lens, max_seqlen_q=meta.max_seqlen_q, **kw)


# ---- reference implementation ------------------------------------------------------------------
def reshape_and_cache_ref(key, value, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = key[keep].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = value[keep].to(v_cache.dtype)


def _attend(q, k, v, q_pos, k_pos, scale, sliding_window, softcap):
    """q [n, Hq, D] at q_pos over k, v [m, Hkv, D] at k_pos; fp32 scores as in HF eager attention."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale           # [Hq, n, m]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    distance = q_pos[:, None] - k_pos[None, :]
    visible = distance >= 0
    if sliding_window is not None:
        visible &= distance < sliding_window
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def _gather(cache, table, first: int, length: int):
    """Positions [first, length) of one sequence; only the blocks holding them are read."""
    positions = torch.arange(first, length, device=cache.device)
    block_size = cache.shape[1]
    return cache[table[positions // block_size].long(), positions % block_size]


def paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, *,
                                max_seqlen_q, scale, sliding_window=None, softcap=None, out=None):
    out = torch.empty_like(q) if out is None else out
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, length in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        if end == start:
            continue
        q_pos = torch.arange(length - (end - start), length, device=q.device)
        first = 0 if sliding_window is None else max(0, length - (end - start) - sliding_window + 1)
        k = _gather(k_cache, block_tables[b], first, length)
        v = _gather(v_cache, block_tables[b], first, length)
        k_pos = torch.arange(first, length, device=q.device)
        out[start:end] = _attend(q[start:end], k, v, q_pos, k_pos, scale, sliding_window, softcap).to(out.dtype)
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, *, scale,
                               sliding_window=None, softcap=None, out=None):
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu, seq_lens, max_seqlen_q=1,
                                       scale=scale, sliding_window=sliding_window, softcap=softcap, out=out)


class ReferenceBackend(AttentionBackend):
    name = "reference"
    reshape_and_cache = staticmethod(reshape_and_cache_ref)
    paged_prefill_attention = staticmethod(paged_prefill_attention_ref)
    paged_decode_attention = staticmethod(paged_decode_attention_ref)


class TritonBackend(AttentionBackend):
    """The Triton kernels of kernels/ (issue 5), imported only when chosen (same signatures)."""

    name = "triton"

    def __init__(self):
        from kernels.dispatch import load_backend
        ops = load_backend("triton")
        self.reshape_and_cache = ops.reshape_and_cache
        self.paged_prefill_attention = ops.paged_prefill_attention
        self.paged_decode_attention = ops.paged_decode_attention


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        from kernels.dispatch import load_backend  # noqa: F401
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
        return TritonBackend()
    return ReferenceBackend()

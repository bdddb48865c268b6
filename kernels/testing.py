"""Random paged-attention problems for tests and benchmarks, built so that wrong reads show up.

Every cache slot that no sequence owns holds NaN, and so does every block a sliding window has left
behind: a kernel that loads one (instead of skipping it) turns its output into NaN even if it masks the
score, because 0 * NaN is NaN in the P @ V product. Block tables are shuffled so logical order never
matches physical order, and `first_block` pushes the used blocks high to exercise int64 offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedProblem:
    q: torch.Tensor              # [T, Hq, D] packed queries (decode: T == B)
    k_cache: torch.Tensor        # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor   # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor   # [B + 1] int32
    seq_lens: torch.Tensor       # [B] int32, context including the new query tokens
    max_seqlen_q: int


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere gives inf so it can never pass."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _block_tables(num_blocks_each, max_blocks, first_block, generator, device):
    total = sum(num_blocks_each)
    physical = first_block + torch.randperm(total, generator=generator)
    tables = torch.zeros(len(num_blocks_each), max_blocks, dtype=torch.int32)
    used = 0
    for b, n in enumerate(num_blocks_each):
        tables[b, :n] = physical[used:used + n].int()
        used += n
    return tables.to(device), first_block + total


def _stale_window_entries(tables, seq_lens, q_lens, block_size, window, stale_block):
    """Point blocks wholly before every query's window at a NaN block, as a freed block would be."""
    if window is None:
        return
    for b, (length, q_len) in enumerate(zip(seq_lens, q_lens)):
        first_visible = max(0, length - q_len - window + 1)
        tables[b, : first_visible // block_size] = stale_block


def make_paged_problem(context_lens, q_lens, *, num_heads: int, num_kv_heads: int, head_dim: int,
                       block_size: int = 16, sliding_window=None, dtype=torch.bfloat16,
                       device="cpu", first_block: int = 0, seed: int = 0) -> PagedProblem:
    """Sequences with context_lens[b] cached tokens before q_lens[b] new query tokens (all in cache)."""
    generator = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(context_lens, q_lens)]
    blocks_each = [-(-length // block_size) for length in seq_lens]
    max_blocks = max(blocks_each) + 1
    tables, end = _block_tables(blocks_each, max_blocks, first_block, generator, device)
    num_blocks = end + 1  # the last block is the stale one, all NaN
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    for b, length in enumerate(seq_lens):
        positions = torch.arange(length, device=device)
        blocks = tables[b, positions // block_size].long()
        kv_shape = (length, num_kv_heads, head_dim)
        k_cache[blocks, positions % block_size] = torch.randn(kv_shape, generator=generator).to(device, dtype)
        v_cache[blocks, positions % block_size] = torch.randn(kv_shape, generator=generator).to(device, dtype)
    _stale_window_entries(tables, seq_lens, q_lens, block_size, sliding_window, end)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=generator).to(device, dtype)
    cu = torch.tensor([0] + list(q_lens), dtype=torch.int32).cumsum(0).int().to(device)
    return PagedProblem(q, k_cache, v_cache, tables, cu,
                        torch.tensor(seq_lens, dtype=torch.int32, device=device), max(q_lens))


@dataclass
class DecodeChainShape:
    """Per-layer widths of a batch-1 decode step; the defaults are Gemma-2-2B's."""
    hidden: int = 2304
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    intermediate: int = 9216
    context: int = 576           # cached tokens before the new one
    block_size: int = 16
    table_blocks: int = 0        # block-table width (the engine's is max_model_len / block_size); 0: just enough


CHAIN_KERNELS = ("qkv", "rope", "attention", "o_proj", "norm", "gate_up", "down")


def decode_layer_chain(num_layers: int, shape: DecodeChainShape = DecodeChainShape(), device="cuda",
                       dtype=torch.bfloat16, seed: int = 0, omit=()):
    """A batch-1 decode step's kernels in the fast path's order (serve/models/gemma.py `forward_fused`)
    over `num_layers` layers of random weights, through the dispatched kernel API: input norm, then per
    layer qkv GEMV, rotary_and_cache, paged decode, o_proj GEMV, norm pair, gate_up+GeGLU GEMV, down
    GEMV, norm pair. Returns run() -> (final normed hidden [1, H], [k caches], [v caches]); every call
    recomputes from the same inputs (the cache write is the same token each time), so two calls under
    different launch settings (PDL on / off) must agree exactly.

    `omit` (names from CHAIN_KERNELS) leaves those launches out, for timing only: what each costs inside
    the chain (evals/lab/bench_batch1.py --ablate). A left-out op passes its input on, or a tensor of its
    output's shape made beforehand, so the result is meaningless but every other launch is unchanged."""
    from compress import kernels
    s, gen = shape, torch.Generator().manual_seed(seed)
    unknown = set(omit) - set(CHAIN_KERNELS)
    if unknown:
        raise ValueError(f"unknown chain kernels {sorted(unknown)}; choose from {CHAIN_KERNELS}")

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype)

    widths = [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim]
    layers = [dict(qkv=rand(sum(widths), s.hidden, scale=s.hidden ** -0.5),
                   o=rand(s.hidden, widths[0], scale=widths[0] ** -0.5),
                   gate_up=rand(2 * s.intermediate, s.hidden, scale=s.hidden ** -0.5),
                   down=rand(s.hidden, s.intermediate, scale=s.intermediate ** -0.5),
                   norms=[rand(s.hidden, scale=0.1) for _ in range(4)],
                   paged=make_paged_problem([s.context], [1], num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                                            head_dim=s.head_dim, block_size=s.block_size, device=device,
                                            dtype=dtype, seed=seed + i))
              for i in range(num_layers)]
    for layer in layers:        # the new token's slot: position `context` through the block table
        tables = layer["paged"].block_tables
        if s.table_blocks > tables.shape[1]:     # padded as the engine's tables are (more decode splits)
            layer["paged"].block_tables = torch.nn.functional.pad(tables, (0, s.table_blocks - tables.shape[1]))
        table = layer["paged"].block_tables[0]
        layer["slot"] = (table[s.context // s.block_size].long() * s.block_size + s.context % s.block_size).view(1)
    final_norm, x = rand(s.hidden, scale=0.1), rand(1, s.hidden)
    positions = torch.tensor([s.context], device=device)
    angles = torch.arange(s.context + 1)[:, None] * torch.rand(s.head_dim // 2, generator=gen)
    rope = torch.cat((angles.cos(), angles.sin()), -1).to(device).contiguous()

    skip = frozenset(omit)
    stand_in = {"qkv": rand(1, sum(widths)), "ffn": rand(1, s.intermediate), "hidden": rand(1, s.hidden)}

    def run():
        h = kernels.rms_norm(x, layers[0]["norms"][0], 1e-6)
        residual = x
        for i, layer in enumerate(layers):
            p = layer["paged"]
            qkv = stand_in["qkv"] if "qkv" in skip else kernels.linear_small_m(h, layer["qkv"])
            q, k, v = qkv.split(widths, -1)
            q = q.view(1, s.num_heads, s.head_dim)
            if "rope" not in skip:
                kernels.rotary_and_cache(positions, q, k.view(1, -1, s.head_dim), v.view(1, -1, s.head_dim),
                                         p.k_cache, p.v_cache, layer["slot"], rope)
            attn = q if "attention" in skip else kernels.paged_decode_attention(
                q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, scale=s.head_dim ** -0.5, softcap=50.0)
            attn = attn.reshape(1, -1)
            o = stand_in["hidden"] if "o_proj" in skip else kernels.linear_small_m(attn, layer["o"])
            post_attn, pre_ffn, post_ffn = layer["norms"][1:]
            if "norm" not in skip:
                h, residual = kernels.rms_norm_pair(o, post_attn, pre_ffn, 1e-6, residual, residual_settled=True)
            else:
                h = o
            act = stand_in["ffn"] if "gate_up" in skip else kernels.gelu_tanh_and_mul_gemv(h, layer["gate_up"])
            down = stand_in["hidden"] if "down" in skip else kernels.linear_small_m(act, layer["down"])
            following = layers[i + 1]["norms"][0] if i + 1 < len(layers) else final_norm
            if "norm" not in skip:
                h, residual = kernels.rms_norm_pair(down, post_ffn, following, 1e-6, residual, residual_settled=True)
            else:
                h = down
        return h, [layer["paged"].k_cache for layer in layers], [layer["paged"].v_cache for layer in layers]
    return run

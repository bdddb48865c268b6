"""Runs one scheduled step: packs the batch into tensors, runs the model, returns logits to sample.

Per step: `input_ids [T]`, `positions [T]`, attention metadata (cu_seqlens_q [B+1], seq_lens [B], and per
KV group a slot_mapping [T] and block_tables [B, M]) built on the host in one pass and copied to the
device; copy-on-write block copies run first; logits are computed only for the sequences that sample.
The fast path (on CUDA by default, `fast_path="on"` elsewhere) fuses the model's projections and norms
and sends pure decode steps through serve/cuda_graphs.py (CUDA graphs on the GPU, the same padded
persistent buffers eagerly elsewhere); prefill and mixed steps run eagerly through `prepare`.
Start-up on CUDA: weights, fused fast path, memory profile (serve/memory.py), KV cache, decode graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve.attention import AttentionMetadata, GroupMetadata, select_backend
from serve.config import EngineConfig
from serve.cuda_graphs import DecodeGraphs
from serve.kv_cache import allocate_caches, check_plan, plan_blocks
from serve.memory import MemoryProfile, host_budget, kv_budget, profile
from serve.models.loader import load_model
from serve.scheduler import ScheduledBatch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@dataclass
class HostInputs:
    """One step's model inputs as host lists (what tensor-parallel rank 0 sends to the other ranks)."""
    ids: list[int]
    positions: list[int]
    cu_seqlens_q: list[int]
    seq_lens: list[int]
    rows: list[int]                  # tokens whose logits are sampled
    slots: dict                      # group key -> slot per token
    block_tables: dict               # group key -> [B][M]
    max_seqlen_q: int
    is_decode: bool


def pack_batch(batch: ScheduledBatch, block_plan: dict, block_size: int) -> HostInputs:
    ids, positions, cu, lens, rows = [], [], [0], [], []
    slots = {key: [] for key in block_plan}
    for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
        ids += seq.token_ids[start:end]
        positions += range(start, end)
        for key, table in seq.block_tables.items():
            slots[key] += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        cu.append(cu[-1] + num_new)
        lens.append(end)
        if batch.samples(i):
            rows.append(cu[-1] - 1)
    tables = {}
    for key in block_plan:
        width = max(len(seq.block_tables[key]) for seq in batch.seqs)
        tables[key] = [seq.block_tables[key] + [0] * (width - len(seq.block_tables[key])) for seq in batch.seqs]
    return HostInputs(ids, positions, cu, lens, rows, slots, tables, batch.max_num_new_tokens, batch.is_decode)


def to_device(inputs: HostInputs, device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
    """(input_ids [T], positions [T], metadata, rows [N])."""
    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
    groups = {key: GroupMetadata(tensor(inputs.slots[key], torch.int64), tensor(inputs.block_tables[key], torch.int32))
              for key in inputs.slots}
    meta = AttentionMetadata(cu_seqlens_q=tensor(inputs.cu_seqlens_q, torch.int32),
                             seq_lens=tensor(inputs.seq_lens, torch.int32), max_seqlen_q=inputs.max_seqlen_q,
                             is_decode=inputs.is_decode, groups=groups)
    return (tensor(inputs.ids, torch.int64), tensor(inputs.positions, torch.int64), meta,
            tensor(inputs.rows, torch.int64))


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model, self.spec = load_model(config.model, self.device, self.dtype)
        self.max_model_len = config.max_model_len or self.spec.max_position_embeddings
        self.backend = select_backend(config.attention_backend, self.device)
        self.decode_graphs: DecodeGraphs | None = None
        fast_path = self._fast_path_on()
        if fast_path:
            self.model.fuse(self.max_model_len)
        use_graphs = fast_path and self._use_graphs()
        self.memory = self._profile(use_graphs)
        self.block_plan = plan_blocks(self.spec, config, self.max_model_len, self.dtype, self._kv_budget())
        check_plan(self.block_plan, config, self.max_model_len)
        self.kv_caches, self.kv_stacks = allocate_caches(self.spec, self.block_plan, config, self.dtype, self.device)
        if fast_path:
            self.decode_graphs = DecodeGraphs(self, self._graph_batch(), use_graphs)

    def _fast_path_on(self) -> bool:
        return self.config.fast_path == "on" or (self.config.fast_path == "auto" and self.device.type == "cuda")

    def _use_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.config.enforce_eager and self.backend.name == "triton"

    def _graph_batch(self) -> int:
        """Largest decode batch of the fast path's buckets (captured as CUDA graphs where they are used)."""
        return min(self.config.max_graph_batch or self.config.max_num_seqs, self.config.max_num_seqs)

    def _profile(self, use_graphs: bool) -> MemoryProfile | None:
        """On CUDA: a worst-case step and the decode graphs, measured before the KV cache takes the rest."""
        if self.device.type != "cuda" or self.config.num_kv_blocks is not None:
            return None
        return profile(self, self._graph_batch() if use_graphs else None)

    def _kv_budget(self) -> int | None:
        if self.config.num_kv_blocks is not None:
            return None
        return kv_budget(self.config, self.memory) if self.memory is not None else host_budget(self.config)

    @property
    def num_graphs(self) -> int:
        """Decode batch sizes captured as CUDA graphs (0: decode runs eagerly)."""
        return len(self.decode_graphs.graphs) if self.decode_graphs is not None else 0

    def eager_reason(self) -> str | None:
        """Why decode runs without CUDA graphs (None: it runs with them)."""
        if self.num_graphs:
            return None
        if self.config.enforce_eager:
            return "--enforce-eager"
        if self.device.type != "cuda":
            return f"{self.device.type} device"
        return "fast path off" if self.decode_graphs is None else f"{self.backend.name} attention backend"

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """(input_ids [T], positions [T], metadata, rows [N] of the tokens whose logits are sampled)."""
        return to_device(pack_batch(batch, self.block_plan, self.config.block_size), self.device)

    def copy_blocks(self, copies: list[tuple]) -> None:
        """Copy-on-write: duplicate a shared block in every layer of its group before writing into it."""
        for key, src, dst in copies:
            for stack in self.kv_stacks[key]:
                stack[:, :, dst] = stack[:, :, src]

    def _is_pure_decode(self, batch: ScheduledBatch) -> bool:
        return len(batch) <= self.decode_graphs.max_batch and batch.is_pure_decode

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [N, vocab] (fp32) for the sequences of `batch` that sample this step, in batch order."""
        self.copy_blocks(batch.copies)
        if self.decode_graphs is not None:
            if self._is_pure_decode(batch):
                return self.decode_graphs.run(batch.seqs)
            self.decode_graphs.argmax = None        # these logits have no argmax computed yet
        input_ids, positions, meta, rows = self.prepare(batch)
        hidden = self.model(input_ids, positions, meta, self.kv_caches, self.backend)
        return self.model.compute_logits(hidden[rows])

    def close(self) -> None:
        """Nothing to release on one device (the tensor-parallel runner stops its workers here)."""

    @torch.inference_mode()
    def run_ahead(self, seqs, prev_tokens: torch.Tensor, src_rows: list[int]) -> torch.Tensor:
        """Logits [B, V] of a decode step launched before the host has its input tokens: sequence i
        decodes the token sampled in row src_rows[i] of the previous step (`prev_tokens`, on the device).
        Slots must be allocated and unshared already (BlockManager.reserve_next_slot)."""
        return self.decode_graphs.run(seqs, prev_tokens, src_rows)

"""Runs one scheduled step: packs the batch into tensors, runs the model, returns logits to sample.

Per step: `input_ids [T]`, `positions [T]`, attention metadata (cu_seqlens_q [B+1], seq_lens [B], and per
KV group a slot_mapping [T] and block_tables [B, M]) built on the host in one pass and copied to the
device; copy-on-write block copies run first; logits are computed only for the sequences that sample.
The fast path (on CUDA by default, `fast_path="on"` elsewhere) fuses the model's projections and norms
and sends pure decode steps through serve/cuda_graphs.py (CUDA graphs on the GPU, the same padded
persistent buffers eagerly elsewhere); prefill and mixed steps run eagerly through `prepare`. Serving a
draft, the runner has verify graphs too (`verify_graphs`, used by serve/speculative/speculator.py).
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


@dataclass
class Span:
    """Tokens of one sequence a forward computes: `ids` at positions start.. (written into its KV), and
    the logits of the last `num_logits` of them."""
    seq: object
    start: int
    ids: list[int]
    num_logits: int


def pack_batch(batch: ScheduledBatch, block_plan: dict, block_size: int) -> HostInputs:
    spans = [Span(seq, seq.num_computed_tokens, seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n],
                  int(batch.samples(i))) for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))]
    return pack_spans(spans, block_plan, block_size)


def pack_spans(spans: list[Span], block_plan: dict, block_size: int, table_key=None) -> HostInputs:
    """HostInputs of `spans`; `table_key(key)` names the sequence's block table of the runner's group
    `key` (a draft model's groups live under their own keys, serve/block_manager.py)."""
    ids, positions, cu, lens, rows = [], [], [0], [], []
    names = {key: table_key(key) if table_key else key for key in block_plan}
    slots = {key: [] for key in block_plan}
    for span in spans:
        start, end = span.start, span.start + len(span.ids)
        ids += span.ids
        positions += range(start, end)
        for key, name in names.items():
            table = span.seq.block_tables[name]
            slots[key] += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        cu.append(cu[-1] + len(span.ids))
        lens.append(end)
        rows += range(cu[-1] - span.num_logits, cu[-1])
    tables = {}
    for key, name in names.items():
        width = max(len(span.seq.block_tables[name]) for span in spans)
        tables[key] = [span.seq.block_tables[name] + [0] * (width - len(span.seq.block_tables[name]))
                       for span in spans]
    max_q = max(len(span.ids) for span in spans)
    return HostInputs(ids, positions, cu, lens, rows, slots, tables, max_q, max_q == 1)


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


SPEC_REMEDY = "lower --max-spec-graph-batch (0: speculative passes run eagerly)"


class ModelRunner:
    table_key = None        # the draft's runner names its groups' tables differently (serve/speculative/)

    def __init__(self, config: EngineConfig, kv_share: float = 1.0):
        self.config = config
        self.kv_share = kv_share            # of the KV budget; a draft model takes the rest
        self.kv_budget_bytes: int | None = None     # what the KV cache was planned with
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model, self.spec = load_model(config.model, self.device, self.dtype)
        self.max_model_len = config.max_model_len or self.spec.max_position_embeddings
        self.backend = select_backend(config.attention_backend, self.device)
        self.decode_graphs: DecodeGraphs | None = None
        self.verify_graphs: DecodeGraphs | None = None      # speculative verify passes (serving a draft)
        fast_path = self._fast_path_on()
        if fast_path:
            self.model.fuse(self.max_model_len)
        use_graphs = fast_path and self._use_graphs()
        self.memory = self._profile(use_graphs)
        self.block_plan = plan_blocks(self.spec, config, self.max_model_len, self.dtype, self._kv_budget())
        check_plan(self.block_plan, config, self.max_model_len)
        self.kv_caches, self.kv_stacks = allocate_caches(self.spec, self.block_plan, config, self.dtype, self.device)
        if fast_path:
            self.decode_graphs, self.verify_graphs = self.build_graphs(use_graphs)

    def _fast_path_on(self) -> bool:
        return self.config.fast_path == "on" or (self.config.fast_path == "auto" and self.device.type == "cuda")

    def _use_graphs(self) -> bool:
        return self.device.type == "cuda" and not self.config.enforce_eager and self.backend.name == "triton"

    def _graph_batch(self) -> int:
        """Largest decode batch of the fast path's buckets (captured as CUDA graphs where they are used)."""
        return min(self.config.max_graph_batch or self.config.max_num_seqs, self.config.max_num_seqs)

    def build_graphs(self, use_graphs: bool) -> tuple[DecodeGraphs, DecodeGraphs | None]:
        """(decode graphs, verify graphs): the latter, serving a draft, for speculative steps of up to
        config.spec_graph_batch sequences verifying q = 2..k+1 tokens each (serve/cuda_graphs.py)."""
        decode = DecodeGraphs(self, self._graph_batch(), use_graphs)
        batch = self.config.spec_graph_batch
        if not batch:
            return decode, None
        lens = tuple(range(2, self.config.max_draft_tokens + 2))
        return decode, DecodeGraphs(self, batch, use_graphs, lens, name="speculative verify", remedy=SPEC_REMEDY)

    def _profile(self, use_graphs: bool) -> MemoryProfile | None:
        """On CUDA: a worst-case step and the graphs, measured before the KV cache takes the rest."""
        if self.device.type != "cuda" or self.config.num_kv_blocks is not None:
            return None
        return profile(self, use_graphs)

    def _kv_budget(self) -> int | None:
        if self.config.num_kv_blocks is not None:
            return None
        budget = kv_budget(self.config, self.memory) if self.memory is not None else host_budget(self.config)
        self.kv_budget_bytes = int(budget * self.kv_share)
        return self.kv_budget_bytes

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

    @torch.inference_mode()
    def run_spans(self, spans: list[Span]) -> torch.Tensor:
        """Logits [sum of num_logits, vocab] (fp32) of a forward over `spans` (any query lengths: draft
        catch-up and speculative verify passes), eagerly through the prefill path."""
        if self.decode_graphs is not None:
            self.decode_graphs.argmax = None
        inputs = pack_spans(spans, self.block_plan, self.config.block_size, self.table_key)
        input_ids, positions, meta, rows = to_device(inputs, self.device)
        hidden = self.model(input_ids, positions, meta, self.kv_caches, self.backend)
        return self.model.compute_logits(hidden[rows])

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

"""Decode on the fast path: metadata packed into one pinned host buffer, one non-blocking copy to the
device, and the whole model step (embedding to soft-capped logits) replayed from a CUDA graph captured
ahead of time per batch-size bucket (the ahead-of-time idea of Nimble; the bucketing of vLLM).

A decode batch of B sequences runs the graph of the smallest bucket >= B; rows past B are padding:
token 0 at position 0, seq_len 1, slot -1 (nothing written), block-table entry 0 (a valid block, so
the kernels read real memory). Block tables have a fixed width (the blocks of max_model_len tokens), so
every graph sees the same shapes. The pinned buffer persists between steps and remembers, per row and
group, which sequence's table it holds (seq id, table version, length): a row is rewritten only when
another sequence lands there or its table grew or had an entry replaced (about one step in block_size
per sequence), and the slots come from the packed rows in one numpy expression, so packing a step is
a few list comprehensions, not per-sequence array writes. Entries of sliding-window blocks freed since a
row was written stay stale there; the kernels never read blocks outside the window (team contract).

Packed int32 layout (host and device): ids [M] | positions [M] | seq_lens [M] | src_rows [M] | per group:
slots [M] | per group: block_tables [M, W_g]; M = the largest bucket. Inside the graph the int64 views
the model needs are cast from it, so one memcpy moves a step's metadata. Without CUDA graphs (CPU, or
`enforce_eager`) the same packing and padding run eagerly, which is how CPU tests cover this file.

A step launched ahead (serve/lookahead.py) does not know its input tokens on the host: they are the
previous step's samples, still on the device. Its rows carry `src_rows` (row i takes the token sampled
in row src_rows[i] of the previous step; -1 in a step whose ids came from the host), and the step's
first kernel (kernels.embed_rms_norm: embedding, scale and first norm) picks the token from the
persistent `tokens` buffer. The graph ends with the logits' argmax written into that buffer, so a greedy
step chains into the next one with no launch outside the graphs but the copies; a step sampled any
other way has its tokens copied into the buffer before the next replay.

The metadata copy moves the block tables only when a row's table changed since the last copy (about
one step in block_size per sequence); otherwise only the per-row fields at the front of the buffer
(ids to slots, a few KB instead of max_batch x max_model_len / block_size entries per group).
Since the host may pack step N+1 while step N's copy out of the pinned buffer is still queued, packing
first waits for an event recorded after that copy.

A capture that fails (out of memory, most likely) raises GraphCaptureError, a ValueError that
`compress serve` reports in one line at start-up: decode never falls back to eager silently; eager is
what `--enforce-eager` asks for. serve/memory.py captures once over a small cache first, to measure the
graphs before the KV cache takes the rest of the memory.
"""

from __future__ import annotations

import numpy as np
import torch

from serve.attention import AttentionMetadata, GroupMetadata
from serve.kv_cache import blocks_per_seq


class GraphCaptureError(ValueError):
    """The decode CUDA graphs could not be captured (a start-up error, not a fallback)."""


def graph_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 32, of 16 to 128, of 32 beyond: few graphs, and padding
    never more than doubles a batch or adds 32 rows."""
    sizes, size = [], 1
    while size <= max_batch:
        sizes.append(size)
        size = size * 2 if size < 8 else size + (8 if size < 32 else 16 if size < 128 else 32)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, use_graphs: bool):
        self.runner = runner
        self.block_size = runner.config.block_size
        self.buckets = graph_buckets(max_batch)
        self.max_batch = m = self.buckets[-1]
        self.keys = list(runner.block_plan)
        # logical block index, not live blocks: a sliding table keeps FREED entries in front
        self.widths = {k: blocks_per_seq(None, runner.config, runner.max_model_len) for k in self.keys}
        size = m * (4 + len(self.keys)) + m * sum(self.widths.values())
        pin = runner.device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=pin)
        self.device_buf = torch.zeros(size, dtype=torch.int32, device=runner.device)
        self.np = self._views(self.host.numpy())
        self.stamps = {k: [None] * m for k in self.keys}   # per row: whose table it holds (see pack)
        self.dev = self._views(self.device_buf)
        dev = runner.device
        self.cu_seqlens = torch.arange(m + 1, dtype=torch.int32, device=dev)
        self.tokens = torch.zeros(m, dtype=torch.int64, device=dev)   # the last step's argmax (see above)
        self.argmax: torch.Tensor | None = None      # the last run's rows of it, for the sampler
        self.header = m * (4 + len(self.keys))       # ids | positions | seq_lens | src_rows | slots
        self.tables_dirty = True                     # host tables changed since the last copy
        # recorded after each copy out of the pinned buffer; packing waits on it before overwriting
        self.copied = torch.cuda.Event() if runner.device.type == "cuda" else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if use_graphs:
            self.capture()

    def _views(self, flat) -> dict:
        m, views, offset = self.max_batch, {}, 0
        for name in ["ids", "positions", "seq_lens", "src_rows"] + [("slots", k) for k in self.keys]:
            views[name], offset = flat[offset:offset + m], offset + m
        for k in self.keys:
            w = self.widths[k]
            views[("tables", k)], offset = flat[offset:offset + m * w].reshape(m, w), offset + m * w
        return views

    # ---- host side: pack one step ---------------------------------------------------------------
    def pack(self, seqs, src_rows: list[int] | None = None) -> int:
        """Write the step's metadata into the pinned buffer; returns the bucket to replay. With
        `src_rows` (a step launched ahead) the ids are left for the device-side gather."""
        num, views, block_size = len(seqs), self.np, self.block_size
        bucket = next(b for b in self.buckets if b >= num)
        pos = np.fromiter((seq.num_computed_tokens for seq in seqs), dtype=np.int64, count=num)
        if src_rows is None:
            views["ids"][:num] = [seq.token_ids[p] for seq, p in zip(seqs, pos.tolist())]
            views["src_rows"][:num] = -1
        else:
            views["src_rows"][:num] = src_rows
        views["src_rows"][num:bucket] = -1
        views["positions"][:num], views["seq_lens"][:num] = pos, pos + 1
        views["ids"][num:bucket], views["positions"][num:bucket], views["seq_lens"][num:bucket] = 0, 0, 1
        rows = np.arange(num)
        for key in self.keys:
            tables, stamps = views[("tables", key)], self.stamps[key]
            for i, seq in enumerate(seqs):
                table = seq.block_tables[key]
                stamp = (seq.seq_id, seq.block_table_version, len(table))
                if stamps[i] != stamp:
                    tables[i, :len(table)], stamps[i] = table, stamp
                    self.tables_dirty = True
            views[("slots", key)][:num] = tables[rows, pos // block_size] * block_size + pos % block_size
            views[("slots", key)][num:bucket] = -1
            if any(stamp is not None for stamp in stamps[num:bucket]):
                tables[num:bucket, 0] = 0
                stamps[num:bucket] = [None] * (bucket - num)
                self.tables_dirty = True
        return bucket

    # ---- device side: one model step over persistent buffers ------------------------------------
    def _step(self, bucket: int) -> torch.Tensor:
        """The captured region: run the model on the packed metadata, return logits [bucket, V]. Ids,
        positions and slots stay int32 (the embedding, the kernels and their references take int32
        indices), so the step starts with the embedding, not with four cast launches."""
        runner, dev = self.runner, self.dev
        groups = {key: GroupMetadata(dev[("slots", key)][:bucket], dev[("tables", key)][:bucket]) for key in self.keys}
        meta = AttentionMetadata(cu_seqlens_q=self.cu_seqlens[:bucket + 1], seq_lens=dev["seq_lens"][:bucket],
                                 max_seqlen_q=1, is_decode=True, groups=groups)
        hidden = runner.model(dev["ids"][:bucket], dev["positions"][:bucket], meta, runner.kv_caches, runner.backend,
                              src_rows=dev["src_rows"][:bucket], prev_tokens=self.tokens)
        # the argmax is read by the next step's embedding (and by the sampler)
        return runner.model.compute_logits(hidden, argmax_out=self.tokens[:bucket])

    def release(self) -> None:
        """Drop the graphs and their outputs (their pool is freed with the last of them)."""
        self.graphs.clear()
        self.outputs.clear()

    def capture(self) -> None:
        """Capture every bucket; GraphCaptureError (with the cause and the way out) when one fails."""
        try:
            self._capture()
        except (RuntimeError, torch.OutOfMemoryError) as err:
            self.release()
            cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise GraphCaptureError(f"capturing the decode CUDA graphs (batch sizes up to {self.max_batch}, "
                                    f"max_model_len {self.runner.max_model_len}) failed: {cause}; lower "
                                    f"--max-num-seqs or --max-model-len, or pass --enforce-eager to decode "
                                    f"without graphs (slower)") from err

    @torch.inference_mode()
    def _capture(self) -> None:
        """Largest bucket first, all graphs in one memory pool (each later graph reuses its space).
        A graph keeps the kernel options (kernels/options.py) it was captured with; called again (a
        benchmark switching one), it drops the old graphs and their pool first."""
        self.release()
        self.np["seq_lens"][:] = 1
        self.np["src_rows"][:] = -1
        for key in self.keys:
            self.np[("slots", key)][:] = -1
        self.device_buf.copy_(self.host)
        pool = None
        for bucket in reversed(self.buckets):
            for _ in range(2):                 # compile Triton variants and warm cuBLAS outside the capture
                self._step(bucket)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bucket] = self._step(bucket)
            pool = graph.pool()
            self.graphs[bucket] = graph
        torch.cuda.synchronize()

    def run(self, seqs, prev_tokens: torch.Tensor | None = None, src_rows: list[int] | None = None) -> torch.Tensor:
        """Logits [B, V] fp32 of a pure decode batch (one new token per sequence, every one sampling);
        their argmax is left in `self.argmax`. A step launched ahead passes the previous step's sampled
        tokens (int64, on the device) and, per row, the row of that step whose token it decodes."""
        if self.copied is not None:
            self.copied.synchronize()
        bucket = self.pack(seqs, src_rows)
        size = self.device_buf.numel() if self.tables_dirty else self.header
        self.device_buf[:size].copy_(self.host[:size], non_blocking=True)
        self.tables_dirty = False
        if self.copied is not None:
            self.copied.record()
        if prev_tokens is not None and prev_tokens.data_ptr() != self.tokens.data_ptr():
            self.tokens[:len(prev_tokens)].copy_(prev_tokens)      # sampled, not the graph's argmax
        num = len(seqs)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            logits = self.outputs[bucket][:num]
        else:
            logits = self._step(bucket)[:num]
        # On the GPU the next step overwrites the buffer only after this step's copies, in stream order;
        # on the CPU it runs at once, before this step's tokens are read.
        self.argmax = self.tokens[:num] if self.tokens.is_cuda else self.tokens[:num].clone()
        return logits

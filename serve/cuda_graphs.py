"""Decode on the fast path: metadata packed into one pinned host buffer, one non-blocking copy to the
device, and the whole model step (embedding to soft-capped logits) replayed from a CUDA graph captured
ahead of time per batch-size bucket (the ahead-of-time idea of Nimble; the bucketing of vLLM).

A decode batch of B sequences runs the graph of the smallest bucket >= B; rows past B are padding:
token 0 at position 0, seq_len 1, slot -1 (nothing written), a block-table row of zeros (a valid block,
so the kernels read real memory). Block tables have a fixed width (the blocks of max_model_len tokens), so
every graph sees the same shapes. The pinned buffer persists between steps and remembers, per row and
group, which sequence's table it holds (seq id, table version, length): a row is rewritten only when
another sequence lands there or its table grew or had an entry replaced or dropped (about one step in
block_size per sequence), and the slots come from the packed rows in one numpy expression, so packing a step is
a few list comprehensions, not per-sequence array writes. Entries of sliding-window blocks freed since a
row was written stay stale there; the kernels never read blocks outside the window (team contract).

Packed int32 layout (host and device): ids [M*Q] | positions [M*Q] | seq_lens [M] | src_rows [M] | per
group: slots [M*Q] | per group: block_tables [M, W_g]; M = the largest bucket, Q the longest query (1 for
decode). Inside the graph the int64 views the model needs are cast from it, so one memcpy moves a step's
metadata. Without CUDA graphs (CPU, or
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

Speculative decoding (serve/speculative/) replays graphs of a uniform query length q > 1 too: the
target's verify pass ([last token, d_1..d_k] per row, q = k + 1) and the draft's catch-up over a lag of
2 tokens. Graphs are keyed by (bucket, q), over cu_seqlens = arange * q and max_seqlen_q = q. A row with
fewer real tokens than q (a lower cap, a lag of 1) is padded after them: the padding has slot -1 (no KV
written) and the row's own position, so the causal attention of the real tokens is unchanged and the
padded logits are ignored (padding rows past the batch get seq_len q); a table row is zero past its
sequence's blocks (the padded queries read real memory), and tables are wide enough for q - 1 tokens
past max_model_len. Such an instance copies its logits into one persistent buffer [M*Q, V], so its
graphs share it instead of keeping one each.

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
    """The CUDA graphs could not be captured (a start-up error, not a fallback)."""


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
    """Graphs of one runner's steps of `query_lens` tokens per row (decode: (1,)), per batch bucket.
    `name` and `remedy` word the start-up error of a failed capture."""

    def __init__(self, runner, max_batch: int, use_graphs: bool, query_lens: tuple[int, ...] = (1,),
                 name: str = "decode", remedy: str = "lower --max-num-seqs or --max-model-len"):
        self.runner, self.name, self.remedy = runner, name, remedy
        self.block_size = runner.config.block_size
        self.buckets = graph_buckets(max_batch)
        self.max_batch = m = self.buckets[-1]
        self.query_lens = tuple(query_lens)
        self.max_q = q = max(self.query_lens)
        self.keys = list(runner.block_plan)
        self.names = {k: runner.table_key(k) if runner.table_key else k for k in self.keys}  # the sequence's tables
        # logical block index, not live blocks: a sliding table keeps FREED entries in front; padded
        # queries reach q - 1 tokens past the last one
        self.widths = {k: blocks_per_seq(None, runner.config, runner.max_model_len + q - 1) for k in self.keys}
        self.header = m * (2 * q + 2 + q * len(self.keys))    # ids | positions | seq_lens | src_rows | slots
        pin = runner.device.type == "cuda"
        self.host = torch.zeros(self.header + m * sum(self.widths.values()), dtype=torch.int32, pin_memory=pin)
        self.device_buf = torch.zeros(self.host.numel(), dtype=torch.int32, device=runner.device)
        self.np = self._views(self.host.numpy())
        self.stamps = {k: [None] * m for k in self.keys}   # per row: whose table it holds (see pack)
        self.dev = self._views(self.device_buf)
        dev = runner.device
        self.cu_seqlens = {n: torch.arange(m + 1, dtype=torch.int32, device=dev) * n for n in self.query_lens}
        self.tokens = torch.zeros(m * q, dtype=torch.int64, device=dev)   # the last step's argmax (see above)
        self.argmax: torch.Tensor | None = None      # the last run's rows of it, for the sampler
        self.logits: torch.Tensor | None = None      # [M*Q, V] shared by the graphs of q > 1 (allocated lazily)
        self.tables_dirty = True                     # host tables changed since the last copy
        # recorded after each copy out of the pinned buffer; packing waits on it before overwriting
        self.copied = torch.cuda.Event() if runner.device.type == "cuda" else None
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        if use_graphs:
            self.capture()

    def _views(self, flat) -> dict:
        m, q, views, offset = self.max_batch, self.max_q, {}, 0
        for name, size in [("ids", m * q), ("positions", m * q), ("seq_lens", m), ("src_rows", m)] + \
                [(("slots", k), m * q) for k in self.keys]:
            views[name], offset = flat[offset:offset + size], offset + size
        for k in self.keys:
            w = self.widths[k]
            views[("tables", k)], offset = flat[offset:offset + m * w].reshape(m, w), offset + m * w
        return views

    # ---- host side: pack one step ---------------------------------------------------------------
    def pack(self, seqs, src_rows: list[int] | None = None) -> int:
        """Write a decode step's metadata into the pinned buffer; returns the bucket to replay. With
        `src_rows` (a step launched ahead) the ids are left for the device-side gather."""
        pos = np.fromiter((seq.num_computed_tokens for seq in seqs), dtype=np.int64, count=len(seqs))
        ids = None if src_rows is not None else [seq.token_ids[p] for seq, p in zip(seqs, pos.tolist())]
        return self._pack(seqs, pos, np.ones(len(seqs), dtype=np.int64), ids, 1, src_rows)

    def pack_spans(self, spans, q: int, src_rows: list[int] | None = None) -> int:
        """Write a step of `spans` (each at most q tokens, padded to q) into the pinned buffer; returns
        the bucket. With `src_rows` (q = 1 only) the ids come from the device's `tokens` instead."""
        num = len(spans)
        starts = np.fromiter((span.start for span in spans), dtype=np.int64, count=num)
        lens = np.fromiter((len(span.ids) for span in spans), dtype=np.int64, count=num)
        ids = None if src_rows is not None else [t for span in spans for t in span.ids + [0] * (q - len(span.ids))]
        return self._pack([span.seq for span in spans], starts, lens, ids, q, src_rows)

    def _pack(self, seqs, starts, lens, ids, q: int, src_rows) -> int:
        """Row i: lens[i] real tokens at positions starts[i].., then padding to q (slot -1)."""
        num, views, block_size = len(seqs), self.np, self.block_size
        bucket = next(b for b in self.buckets if b >= num)
        end = bucket * q                                        # tokens the graph computes
        if ids is not None:
            views["ids"][:num * q] = ids
        views["src_rows"][:num] = -1 if src_rows is None else src_rows
        views["src_rows"][num:bucket] = -1
        pos = starts[:, None] + np.arange(q)                    # [num, q]
        real = np.arange(q) < lens[:, None] if q > 1 else None     # decode (q = 1) has no padding
        views["positions"][:num * q] = (pos if real is None else np.where(real, pos, starts[:, None])).ravel()
        views["seq_lens"][:num] = starts + q
        views["ids"][num * q:end], views["positions"][num * q:end], views["seq_lens"][num:bucket] = 0, 0, q
        rows = np.arange(num)[:, None]
        for key in self.keys:
            tables, stamps, name = views[("tables", key)], self.stamps[key], self.names[key]
            for i, seq in enumerate(seqs):
                table = seq.block_tables[name]
                stamp = (seq.seq_id, seq.block_table_version, len(table))
                if stamps[i] != stamp:
                    tables[i, :len(table)], tables[i, len(table):], stamps[i] = table, 0, stamp
                    self.tables_dirty = True
            slots = tables[rows, pos // block_size] * block_size + pos % block_size
            views[("slots", key)][:num * q] = (slots if real is None else np.where(real, slots, -1)).ravel()
            views[("slots", key)][num * q:end] = -1
            if any(stamp is not None for stamp in stamps[num:bucket]):
                tables[num:bucket] = 0
                stamps[num:bucket] = [None] * (bucket - num)
                self.tables_dirty = True
        return bucket

    # ---- device side: one model step over persistent buffers ------------------------------------
    def _step(self, bucket: int, q: int) -> torch.Tensor:
        """The captured region: run the model on the packed metadata, return logits [bucket * q, V]. Ids,
        positions and slots stay int32 (the embedding, the kernels and their references take int32
        indices), so the step starts with the embedding, not with four cast launches."""
        runner, dev, n = self.runner, self.dev, bucket * q
        groups = {key: GroupMetadata(dev[("slots", key)][:n], dev[("tables", key)][:bucket]) for key in self.keys}
        meta = AttentionMetadata(cu_seqlens_q=self.cu_seqlens[q][:bucket + 1], seq_lens=dev["seq_lens"][:bucket],
                                 max_seqlen_q=q, is_decode=q == 1, groups=groups)
        ahead = dict(src_rows=dev["src_rows"][:bucket], prev_tokens=self.tokens) if q == 1 else {}
        hidden = runner.model(dev["ids"][:n], dev["positions"][:n], meta, runner.kv_caches, runner.backend, **ahead)
        # the argmax is read by the next step's embedding (and by the sampler)
        logits = runner.model.compute_logits(hidden, argmax_out=self.tokens[:n])
        if self.max_q == 1:
            return logits
        if self.logits is None:
            self.logits = torch.empty(self.max_batch * self.max_q, logits.shape[1], dtype=logits.dtype,
                                      device=logits.device)
        return self.logits[:n].copy_(logits)

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
            lens = "" if self.max_q == 1 else f", query lengths {min(self.query_lens)}..{self.max_q}"
            raise GraphCaptureError(f"capturing the {self.name} CUDA graphs (batch sizes up to {self.max_batch}{lens}, "
                                    f"max_model_len {self.runner.max_model_len}) failed: {cause}; {self.remedy}, "
                                    f"or pass --enforce-eager to run without graphs (slower)") from err

    @torch.inference_mode()
    def _capture(self) -> None:
        """Largest step first, all graphs in one memory pool (each later graph reuses its space).
        A graph keeps the kernel options (kernels/options.py) it was captured with; called again (a
        benchmark switching one), it drops the old graphs and their pool first."""
        self.release()
        self.np["seq_lens"][:] = self.max_q
        self.np["src_rows"][:] = -1
        for key in self.keys:
            self.np[("slots", key)][:] = -1
        self.device_buf.copy_(self.host)
        pool = None
        shapes = sorted(((b, q) for b in self.buckets for q in self.query_lens), key=lambda s: -s[0] * s[1])
        for shape in shapes:
            for _ in range(2):                 # compile Triton variants and warm cuBLAS outside the capture
                self._step(*shape)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[shape] = self._step(*shape)
            pool = graph.pool()
            self.graphs[shape] = graph
        torch.cuda.synchronize()

    def run(self, seqs, prev_tokens: torch.Tensor | None = None, src_rows: list[int] | None = None) -> torch.Tensor:
        """Logits [B, V] fp32 of a pure decode batch (one new token per sequence, every one sampling);
        their argmax is left in `self.argmax`. A step launched ahead passes the previous step's sampled
        tokens (int64, on the device) and, per row, the row of that step whose token it decodes."""
        self._wait_copied()
        bucket = self.pack(seqs, src_rows)
        self._copy_metadata()
        if prev_tokens is not None and prev_tokens.data_ptr() != self.tokens.data_ptr():
            self.tokens[:len(prev_tokens)].copy_(prev_tokens)      # sampled, not the graph's argmax
        return self._replay(bucket, 1, len(seqs))

    @torch.inference_mode()
    def run_spans(self, spans, q: int, src_rows: list[int] | None = None) -> torch.Tensor:
        """Logits [N * q, V] fp32 of N spans padded to q tokens each (row i's token t at i * q + t; the
        padded rows' logits are garbage); their argmax is left in `self.argmax`. With `src_rows` (q = 1)
        row i decodes the token this instance's previous step left in `tokens[src_rows[i]]` (a greedy
        draft chaining on the device)."""
        self._wait_copied()
        bucket = self.pack_spans(spans, q, src_rows)
        self._copy_metadata()
        return self._replay(bucket, q, len(spans))

    def _wait_copied(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()

    def _copy_metadata(self) -> None:
        size = self.device_buf.numel() if self.tables_dirty else self.header
        self.device_buf[:size].copy_(self.host[:size], non_blocking=True)
        self.tables_dirty = False
        if self.copied is not None:
            self.copied.record()

    def _replay(self, bucket: int, q: int, num: int) -> torch.Tensor:
        if (bucket, q) in self.graphs:
            self.graphs[(bucket, q)].replay()
            logits = self.outputs[(bucket, q)][:num * q]
        else:
            logits = self._step(bucket, q)[:num * q]
        # On the GPU the next step overwrites the buffer only after this step's copies, in stream order;
        # on the CPU it runs at once, before this step's tokens are read.
        self.argmax = self.tokens[:num * q] if self.tokens.is_cuda else self.tokens[:num * q].clone()
        return logits

"""Cost models for the mask search: FLOPs (Kwon et al. 2022, Sec. 4.1) and a measured latency table.

FLOPs count a multiply-add as 2 and cover only what pruning can remove, per layer at sequence
length S (taken from the calibration data):
- one attention head: the Q, K, V and O projections, 4 * 2*S*hidden*head_dim, plus the two
  attention matrix products (scores and weighted values), 2 * 2*S*S_attn*head_dim, where S_attn
  is S or the sliding window when smaller;
- one FFN filter: its row in each input projection and its column in the output projection,
  (num_in_proj + 1) * 2*S*hidden (2 projections in BERT, 3 in gated MLPs).
With grouped-query attention a kv head's K and V projections are shared by its query heads; the
per-query-head cost charges each query head its share (exact when groups are pruned whole).

The latency table (for `--latency-ms`, measured by `compress.pruning.latency.measure_table`): a layer's
latency is attention[h] + ffn(f) for h kept heads and f kept filters, plus the time of everything
else; ffn(f) interpolates linearly between the measured widths, unless the table is `exact_widths`
(measured on a GPU), in which case the search keeps only the measured widths.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch


@dataclass
class CostModel:
    """Per-layer FLOPs of one head and one filter; prunable FLOPs = sum of kept heads and filters."""

    head_cost: list[float]
    filter_cost: list[float]
    seq_len: float = 0.0

    def flops(self, head_masks, filter_masks) -> float:
        heads = sum(float((m != 0).sum()) * c for m, c in zip(head_masks, self.head_cost))
        filters = sum(float((m != 0).sum()) * c for m, c in zip(filter_masks, self.filter_cost))
        return heads + filters

    def flops_counts(self, num_heads: list[int], num_filters: list[int]) -> float:
        return sum(h * c for h, c in zip(num_heads, self.head_cost)) + sum(
            f * c for f, c in zip(num_filters, self.filter_cost))


def flops_model(adapter, seq_len: float, windows: list[int | None] | None = None) -> CostModel:
    """The FLOPs cost model of the model behind `adapter` at mean sequence length `seq_len`."""
    hidden, d = adapter.hidden_size(), adapter.head_dim()
    head_cost, filter_cost = [], []
    for i in range(adapter.num_layers):
        parts = adapter.layer_parts(i)
        window = windows[i] if windows else None
        s_attn = min(seq_len, window) if window else seq_len
        group = parts.num_heads / parts.num_kv_heads if parts.num_kv_heads else 1.0
        proj = (2 + 2 / group) * 2 * seq_len * hidden * d
        head_cost.append(proj + 2 * 2 * seq_len * s_attn * d)
        filter_cost.append((len(parts.ffn_in) + 1) * 2 * seq_len * hidden)
    return CostModel(head_cost, filter_cost, seq_len)


@dataclass
class LatencyTable:
    """Measured milliseconds of one layer's attention by head count and FFN by width."""

    attention_ms: list[float]  # index h = number of heads, 0..H
    ffn_widths: list[int]
    ffn_ms: list[float]
    overhead_ms: float = 0.0  # embeddings, classifier and anything else not pruned
    exact_widths: bool = False  # the search may keep only `ffn_widths` (time is a step function of width)
    meta: dict = field(default_factory=dict)

    def ffn(self, width: float) -> float:
        xs, ys = self.ffn_widths, self.ffn_ms
        for k in range(1, len(xs)):
            if width <= xs[k]:
                t = (width - xs[k - 1]) / (xs[k] - xs[k - 1])
                return ys[k - 1] + t * (ys[k] - ys[k - 1])
        return ys[-1]

    def layer_ms(self, heads: int, filters: int) -> float:
        return self.attention_ms[heads] + self.ffn(filters)

    def model_ms(self, heads: list[int], filters: list[int]) -> float:
        """Predicted forward time of a model with these kept heads and filters per layer."""
        return self.overhead_ms + sum(self.layer_ms(h, f) for h, f in zip(heads, filters))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        table = cls(**d)
        if len(table.ffn_widths) != len(table.ffn_ms) or len(table.ffn_widths) < 2 or len(table.attention_ms) < 2:
            raise ValueError("attention_ms needs 2+ entries and ffn_widths / ffn_ms 2+ of equal length")
        if list(table.ffn_widths) != sorted(set(table.ffn_widths)) or table.ffn_widths[0] != 0:
            raise ValueError("ffn_widths must rise from 0")
        return table


def _timer(device: torch.device):
    """Milliseconds of `fn()`: CUDA events on GPU (the launch is asynchronous), perf_counter on CPU."""

    def measure(fn, reps: int) -> float:
        fn()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1000 / reps

    return measure

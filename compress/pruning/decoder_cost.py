"""FLOPs of a decoder (Gemma 2/3) by layer shape: the cost model of the GQA-aware search.

One forward pass over a context of C tokens (a prefill of `--context-len`), multiply-add = 2 FLOPs:
- a query head of layer l: its rows of q_proj and columns of o_proj, 2 * 2*C*hidden*head_dim, plus
  scores and weighted values, 2 * 2*head_dim*A_l, where A_l = sum_{i=1..C} min(i, W_l) is the number
  of (query, key) pairs of causal attention with window W_l (W_l = C on global layers; the window
  counts the current token, as in HF);
- a kv head: its rows of k_proj and v_proj, 2 * 2*C*hidden*head_dim (shared by its query heads;
  charged once per kept kv head, which is what makes removing a whole KV group cheaper);
- an MLP filter: a row of gate_proj and of up_proj and a column of down_proj, 3 * 2*C*hidden.
Norms, RoPE and activations are left out (linear in C*hidden, small). The token embedding (a
lookup) and the LM head (2*C*hidden*vocab) are reported separately and are never pruned; `--flops F`
is a fraction of the non-embedding FLOPs `dense_flops()`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DecoderCost:
    """Per-layer FLOPs of one query head, one kv head and one filter at `context_len` tokens."""

    q_cost: list[float]
    kv_cost: list[float]
    filter_cost: list[float]
    dense_heads: list[int]
    dense_kv_heads: list[int]
    dense_filters: list[int]
    lm_head_flops: float
    context_len: int

    def layer_flops(self, layer: int, num_heads: int, num_kv_heads: int, num_filters: int) -> float:
        return (num_heads * self.q_cost[layer] + num_kv_heads * self.kv_cost[layer]
                + num_filters * self.filter_cost[layer])

    def flops(self, num_heads, num_kv_heads, num_filters) -> float:
        """Non-embedding FLOPs of a model with these per-layer counts."""
        return sum(self.layer_flops(i, h, k, f) for i, (h, k, f) in enumerate(zip(num_heads, num_kv_heads, num_filters)))

    def dense_flops(self) -> float:
        return self.flops(self.dense_heads, self.dense_kv_heads, self.dense_filters)

    def attention_flops(self, num_heads, num_kv_heads) -> float:
        return self.flops(num_heads, num_kv_heads, [0] * len(num_heads))

    def flops_of_masks(self, head_masks, filter_masks, group_sizes) -> float:
        """FLOPs of 0/1 (or tuned) masks; a kv head counts while any of its query heads is kept."""
        heads = [int((m != 0).sum()) for m in head_masks]
        kv = [kept_kv_heads(m, g) for m, g in zip(head_masks, group_sizes)]
        filters = [int((m != 0).sum()) for m in filter_masks]
        return self.flops(heads, kv, filters)


def kept_kv_heads(head_mask, group: int) -> int:
    """Number of kv groups with at least one kept query head."""
    return int((head_mask != 0).reshape(-1, group).any(dim=1).sum())


def attended_pairs(context_len: int, window: int | None) -> int:
    """sum_{i=1..C} min(i, W): (query, key) pairs of causal attention with an optional window."""
    c = context_len
    w = c if window is None else min(window, c)
    return w * (w + 1) // 2 + (c - w) * w


def decoder_cost(adapter, context_len: int) -> DecoderCost:
    """The cost model of the (possibly already slimmed) decoder behind `adapter` at `context_len` tokens."""
    hidden, d, c = adapter.hidden_size(), adapter.head_dim(), context_len
    windows = adapter.sliding_windows()
    q_cost, kv_cost, filter_cost = [], [], []
    for i in range(adapter.num_layers):
        parts = adapter.layer_parts(i)
        q_cost.append(2 * 2.0 * c * hidden * d + 2 * 2.0 * d * attended_pairs(c, windows[i]))
        kv_cost.append(2 * 2.0 * c * hidden * d)
        filter_cost.append((len(parts.ffn_in) + 1) * 2.0 * c * hidden)
    vocab = adapter.config.vocab_size
    return DecoderCost(q_cost, kv_cost, filter_cost, adapter.num_heads(), adapter.num_kv_heads(),
                       adapter.num_filters(), 2.0 * c * hidden * vocab, c)

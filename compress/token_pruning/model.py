"""Encoder forward that prunes tokens after every layer (Kim et al., "Learned Token Pruning for
Transformers", KDD 2022).

Importance of token j after layer l: the attention probability it receives, averaged over heads and
over the (kept, non-padding) query positions. Tokens under the layer's threshold are pruned; [CLS]
(position 0) never is, padding never counts. One model, four forwards (`mode`):
  - "dense":  no pruning (the parent model, run through the same code);
  - "soft":   training stage 1: mask m = sigmoid((importance - threshold_l) / T) multiplies into a
              running mask M that scales the layer output and enters later attention as log M on keys,
              so M in {0, 1} is exactly the hard forward;
  - "masked": hard 0/1 masks, dropped tokens get -inf as keys (training stage 2; test reference);
  - "drop":   inference: dropped tokens are removed (gather per sequence, re-padded to the longest
              survivor in the batch for attention; projections and FFN run on the packed real tokens),
              so time falls with the kept length. On a GPU what a layer costs besides its work is host
              syncs: the packing indices are found once per layer (one sync, with the new width's), and
              attention whose probabilities no decision reads (the last layer; every layer in "dense")
              runs fused through scaled_dot_product_attention.
A threshold is applied after each layer but the last (pruning after the last layer changes neither
the output, which reads [CLS] only, nor the cost), so there are num_hidden_layers - 1 of them.
Shapes: B batch, S sequence, D hidden, h heads of the current layer, L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from compress.token_pruning import parts as P

MODES = ("dense", "soft", "masked", "drop")


@dataclass
class PruningSpec:
    """What a token-pruned checkpoint stores under config.json["token_pruning"]."""

    rule: str = "threshold"  # "threshold" (learned) or "topk" (fixed keep ratio per layer, the baseline)
    thresholds: list[float] = field(default_factory=list)  # [L - 1], applied after layers 0..L-2
    keep_ratios: list[float] = field(default_factory=list)  # [L - 1], fraction of the input length
    temperature: float = 1e-3

    def validate(self, num_layers: int) -> None:
        if self.rule not in ("threshold", "topk"):
            raise ValueError(f"token pruning rule must be 'threshold' or 'topk', got {self.rule!r}")
        values = self.thresholds if self.rule == "threshold" else self.keep_ratios
        if len(values) != num_layers - 1:
            raise ValueError(f"need {num_layers - 1} per-layer values for {self.rule}, got {len(values)}")
        if self.rule == "threshold" and not all(0.0 <= t < 1.0 for t in values):
            raise ValueError(f"thresholds must lie in [0, 1): {values}")
        if self.rule == "topk" and not all(0.0 < r <= 1.0 for r in values):
            raise ValueError(f"keep ratios must lie in (0, 1]: {values}")


@dataclass
class TokenPruningOutput:
    logits: torch.Tensor  # [B, num_labels]
    num_tokens: torch.Tensor  # [B, L] tokens each layer ran on (soft: expected count, sum of M)
    mask_mean: torch.Tensor  # scalar: mean over examples and pruning layers of kept fraction
    loss: torch.Tensor | None = None  # task loss only; the trainer adds lambda * mask_mean


class TokenPruningModel(nn.Module):
    """Wraps a HF sequence-classification encoder; `thresholds` is the only new parameter."""

    def __init__(self, model: nn.Module, spec: PruningSpec):
        super().__init__()
        P.model_type(model)
        self.model = model
        self.parts = P.layer_parts(model)
        spec.validate(len(self.parts))
        self.spec = spec
        self.head_dim = P.head_dim(model.config)
        self.p_hidden, self.p_attn = P.dropout_probs(model.config)
        self.thresholds = nn.Parameter(torch.tensor(spec.thresholds or [0.0] * (len(self.parts) - 1)))
        self.mode = "drop"

    @property
    def config(self):
        return self.model.config

    def current_spec(self) -> PruningSpec:
        thresholds = [float(t) for t in self.thresholds.detach().cpu()] if self.spec.rule == "threshold" else []
        return PruningSpec(self.spec.rule, thresholds, list(self.spec.keep_ratios), self.spec.temperature)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, mode=None):
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        x, _, num_tokens, fractions = self.hidden_states(input_ids, attention_mask, token_type_ids, mode)
        logits = P.classify(self.model, x)
        mask_mean = torch.stack(fractions).mean() if fractions else logits.new_zeros(())
        return TokenPruningOutput(logits, num_tokens, mask_mean, self._task_loss(logits, labels))

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None, mode=None):
        """The last layer's states `[B, S', D]`, the tokens they are of `[B, S']` (bool; S' is the longest
        survivor in "drop" mode), tokens per layer `[B, L]`, and the kept fractions of the pruning layers."""
        mode = mode or self.mode
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        x = P.embed(self.model, input_ids, token_type_ids)
        run = self._run_soft if mode == "soft" else self._run_hard
        return run(x, valid, drop=(mode == "drop"), dense=(mode == "dense"))

    def _run_hard(self, x, valid, drop: bool, dense: bool):
        kept, lengths = valid, valid.sum(1)
        positions = torch.arange(x.shape[1], device=x.device).expand_as(valid)
        counts, fractions = [], []
        for layer, parts in enumerate(self.parts):
            scores = not dense and layer < len(self.parts) - 1  # the last layer's drop would change nothing
            packed = kept.flatten().nonzero().squeeze(1) if drop else None  # one host sync per layer
            x, probs = self._layer(parts, x, _key_bias(kept, x.dtype), positions, packed, scores)
            counts.append(kept.sum(1))
            if not scores or probs.shape[1] == 0:
                continue
            kept = self._decide(layer, importance(probs, kept.to(probs.dtype)), kept, lengths)
            fractions.append((kept.sum(1) / lengths).mean())
            if drop:
                x, kept, positions = compact(x, kept, positions)
        return x, kept, torch.stack(counts, 1).to(x.dtype), fractions

    def _run_soft(self, x, valid, drop: bool, dense: bool):
        mask = valid.to(x.dtype)  # running soft mask M [B, S]
        positions = torch.arange(x.shape[1], device=x.device).expand_as(valid)
        lengths, counts, fractions = mask.sum(1), [], []
        for layer, parts in enumerate(self.parts):
            key_bias = torch.log(mask.clamp_min(1e-30))[:, None, None, :] + _key_bias(valid, x.dtype)
            x, probs = self._layer(parts, x, key_bias, positions)
            counts.append(mask.sum(1))
            if layer == len(self.parts) - 1 or probs.shape[1] == 0:
                continue
            score = importance(probs, mask)
            soft = torch.sigmoid((score - self.thresholds[layer]) / self.spec.temperature)
            mask = mask * torch.cat([torch.ones_like(soft[:, :1]), soft[:, 1:]], dim=1)  # [CLS] stays
            fractions.append((mask.sum(1) / lengths).mean())
            x = x * mask[..., None]
        return x, mask, torch.stack(counts, 1), fractions

    def _decide(self, layer: int, score, kept, lengths):
        """Boolean keep mask [B, S] after `layer`; a subset of `kept` that always holds [CLS]."""
        score = score.masked_fill(~kept, -math.inf)
        score[:, 0] = math.inf
        if self.spec.rule == "threshold":
            return score >= self.thresholds[layer].detach()
        k = torch.ceil(self.spec.keep_ratios[layer] * lengths.to(torch.float64)).long().clamp(min=1)
        k = torch.minimum(k, kept.sum(1))
        rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        return rank < k[:, None]

    def _layer(self, parts: P.LayerParts, x, key_bias, positions, packed=None, probs_needed: bool = True):
        """One post-LN encoder layer; returns its output [B, S, D] and attention probs [B, h, S, S].

        With `packed` (the flat indices [T] of the real tokens in [B * S]) every position-wise part
        (projections, norms, FFN) runs on the T real tokens only, so its cost follows the kept lengths,
        not the padding; only the attention itself works on the re-padded [B, h, S, S] layout. Without
        `probs_needed` the attention runs fused (scaled_dot_product_attention, no [B, h, S, S] in memory)
        and no probabilities are returned.
        """
        B, S, _ = x.shape
        tokens = x if packed is None else x.flatten(0, 1).index_select(0, packed)  # [B, S, D] or [T, D]
        heads = parts.num_heads
        if heads == 0:  # the branch is just the output projection's bias
            attn, probs = parts.o(tokens.new_zeros(*tokens.shape[:-1], 0)), x.new_zeros(B, 0, S, S)
        else:
            q, k, v = (self._split_heads(proj(tokens), packed, B, S) for proj in (parts.q, parts.k, parts.v))
            bias = P.position_bias(self.model, positions, x)
            if bias is not None:
                key_bias = key_bias + (bias if parts.bias_heads is None else bias[:, parts.bias_heads])
            context, probs = self._attention(q, k, v, key_bias, probs_needed)  # [B, h, S, d], [B, h, S, S] or None
            context = context.transpose(1, 2).reshape(B, S, heads * self.head_dim)
            attn = parts.o(context if packed is None else context.flatten(0, 1).index_select(0, packed))
        out = self._finish_layer(parts, tokens, attn)
        return (out, probs) if packed is None else (_unpack(out, packed, B, S), probs)

    def _attention(self, q, k, v, bias, probs_needed: bool):
        if not probs_needed:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.head_dim**-0.5,
                                                     dropout_p=self.p_attn if self.training else 0.0)
            return context, None
        probs = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5 + bias, dim=-1)
        return F.dropout(probs, self.p_attn, self.training) @ v, probs

    def _split_heads(self, y, packed, B: int, S: int):
        """[B, S, h*d] or packed [T, h*d] -> [B, h, S, d] (padding rows zero)."""
        if packed is not None:
            y = _unpack(y, packed, B, S)
        return y.view(B, S, -1, self.head_dim).transpose(1, 2)

    def _finish_layer(self, parts: P.LayerParts, x, attn):
        """Residual + norm around attention, then the FFN with its residual + norm."""
        a = parts.attn_norm(x + F.dropout(attn, self.p_hidden, self.training))
        y = parts.ffn_out(parts.act(parts.ffn_in(a)))
        return parts.out_norm(a + F.dropout(y, self.p_hidden, self.training))

    def _task_loss(self, logits, labels):
        if labels is None:
            return None
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        return F.cross_entropy(logits, labels)


def importance(probs: torch.Tensor, query_weight: torch.Tensor) -> torch.Tensor:
    """Attention each key receives [B, S]: mean over heads, weighted mean over queries.

    probs: [B, h, S, S] (query, key); query_weight: [B, S], 0 for padding and dropped tokens.
    """
    with torch.autocast(probs.device.type, enabled=False):  # thresholds are ~1e-2: keep fp32 under bf16
        probs, query_weight = probs.float(), query_weight.float()
        received = torch.einsum("bhqk,bq->bk", probs, query_weight) / probs.shape[1]
        return received / query_weight.sum(1, keepdim=True).clamp_min(1e-9)


def compact(x, keep, positions):
    """Move kept tokens to the front (order preserved) and cut the batch to the longest survivor."""
    lengths = keep.sum(1)
    width = int(lengths.max())
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
    x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    kept = torch.arange(width, device=x.device)[None, :] < lengths[:, None]
    return x, kept, positions.gather(1, order)


def _unpack(rows: torch.Tensor, packed: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """Packed rows [T, F] at flat indices `packed` [T] -> [B, S, F], zero elsewhere."""
    return rows.new_zeros(B * S, rows.shape[-1]).index_copy_(0, packed, rows).view(B, S, -1)


def _key_bias(kept: torch.Tensor, dtype) -> torch.Tensor:
    """Additive attention bias [B, 1, 1, S]: 0 on kept keys, the dtype's minimum elsewhere."""
    bias = torch.zeros(kept.shape, dtype=dtype, device=kept.device)
    return bias.masked_fill(~kept, torch.finfo(dtype).min)[:, None, None, :]

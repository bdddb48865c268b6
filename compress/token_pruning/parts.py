"""Where each supported encoder keeps its pieces, for the token-dropping forward in `model.py`.

Layers come from the head/filter pruner's architecture adapters (`compress.arch`, the owner of
module paths); this file adds what they do not cover: the embeddings, the task head and MPNet's
relative position bias (BERT and MiniLM, RoBERTa, DistilBERT, MPNet). All four are post-LayerNorm
encoders with the same layer shape:
    a = LN1(x + O(attention(Q x, K x, V x)));  y = LN2(a + W2 act(W1 a))
so one generic forward runs them all. Head counts are read from the weight shapes, never from the
config, so models slimmed by `compress prune` (uneven heads per layer, possibly zero) work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from transformers.activations import ACT2FN

from compress.arch import get_adapter
from compress.errors import UserError

SUPPORTED = ("bert", "roberta", "distilbert", "mpnet")


@dataclass
class LayerParts:
    """One encoder layer as the token-dropping forward runs it (q/k/v are None with 0 heads)."""

    q: nn.Linear | None  # [heads * head_dim] outputs
    k: nn.Linear | None
    v: nn.Linear | None
    o: nn.Linear
    attn_norm: nn.Module
    ffn_in: nn.Linear
    act: nn.Module
    ffn_out: nn.Linear
    out_norm: nn.Module
    num_heads: int
    bias_heads: list[int] | None = None  # MPNet: which heads of the shared position bias it kept


def model_type(model: nn.Module) -> str:
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED:
        raise UserError(f"token pruning needs an encoder ({', '.join(SUPPORTED)}); this model is {kind!r}")
    return kind


def base_model(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def head_dim(config) -> int:
    hidden = getattr(config, "hidden_size", None) or config.dim
    heads = getattr(config, "num_attention_heads", None) or config.n_heads
    return getattr(config, "head_dim", None) or hidden // heads


def dropout_probs(config) -> tuple[float, float]:
    """(hidden dropout, attention-probability dropout) as the HF layers use them."""
    if config.model_type == "distilbert":
        return config.dropout, config.attention_dropout
    return config.hidden_dropout_prob, config.attention_probs_dropout_prob


def layer_parts(model: nn.Module) -> list[LayerParts]:
    """Every layer's parts, via the head/filter pruner's architecture adapter (compress.arch)."""
    model_type(model)
    adapter = get_adapter(model)
    config = model.config
    act = ACT2FN[getattr(config, "hidden_act", None) or config.activation]
    layers = []
    for i in range(adapter.num_layers):
        p = adapter.layer_parts(i)
        heads = 0 if p.q is None else p.q.out_features // head_dim(config)
        bias_heads = adapter._head_index(i) if config.model_type == "mpnet" else None
        if bias_heads is not None and len(bias_heads) == config.num_attention_heads:
            bias_heads = None  # all heads kept, in order
        layers.append(LayerParts(p.q, p.k, p.v, p.o, p.attn_norm, p.ffn_in[0], act, p.ffn_out, p.ffn_norm,
                                 heads, bias_heads))
    return layers


def embed(model: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
    """Token + position (+ segment) embeddings, exactly as the HF model computes them. [B, S, D]"""
    kind, emb = model.config.model_type, base_model(model).embeddings
    if kind in ("distilbert", "mpnet"):
        return emb(input_ids=input_ids)
    return emb(input_ids=input_ids, token_type_ids=token_type_ids)


def position_bias(model: nn.Module, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
    """MPNet's relative position bias for the tokens at original `positions` [B, S] -> [B, H, S, S].

    Relative distances are taken between original positions, so a shortened sequence sees the
    same bias between two surviving tokens as the full one did.
    """
    if model.config.model_type != "mpnet":
        return None
    encoder = base_model(model).encoder
    relative = positions[:, None, :] - positions[:, :, None]  # key minus query, as HF computes it
    buckets = encoder.relative_position_bucket(relative)  # HF always uses its default of 32 buckets
    return encoder.relative_attention_bias(buckets).permute(0, 3, 1, 2).to(hidden.dtype)


def classify(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The task head on the final hidden states [B, S, D] (reads position 0, the [CLS] token)."""
    kind = model.config.model_type
    if kind == "bert":
        return model.classifier(model.dropout(model.bert.pooler(hidden)))
    if kind == "distilbert":
        pooled = nn.functional.relu(model.pre_classifier(hidden[:, 0]))
        return model.classifier(model.dropout(pooled))
    return model.classifier(hidden)

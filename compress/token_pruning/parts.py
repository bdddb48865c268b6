"""Where each supported encoder keeps its pieces, for the token-dropping forward in `model.py`.

This is the one file of the token pruner that knows Hugging Face module paths (BERT and MiniLM,
RoBERTa, DistilBERT, MPNet). All four are post-LayerNorm encoders with the same layer shape:
    a = LN1(x + O(attention(Q x, K x, V x)));  y = LN2(a + W2 act(W1 a))
so a layer is described by its modules (`LayerParts`) and one generic forward runs them all.
Head counts are read from the weight shapes, never from the config, so models slimmed by
`compress prune` (uneven heads per layer, possibly zero) work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import UserError

SUPPORTED = ("bert", "roberta", "distilbert", "mpnet")


@dataclass
class LayerParts:
    """The modules of one encoder layer (shapes: q/k/v/o are [heads * head_dim] wide)."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    attn_norm: nn.LayerNorm
    ffn_in: nn.Linear
    act: nn.Module
    ffn_out: nn.Linear
    out_norm: nn.LayerNorm

    def num_heads(self, head_dim: int) -> int:
        return self.q.out_features // head_dim


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
    kind, base = model_type(model), base_model(model)
    if kind == "distilbert":
        return [_distilbert_parts(layer) for layer in base.transformer.layer]
    if kind == "mpnet":
        return [_mpnet_parts(layer) for layer in base.encoder.layer]
    return [_bert_parts(layer) for layer in base.encoder.layer]


def _bert_parts(layer) -> LayerParts:
    att = layer.attention
    return LayerParts(att.self.query, att.self.key, att.self.value, att.output.dense, att.output.LayerNorm,
                      layer.intermediate.dense, layer.intermediate.intermediate_act_fn,
                      layer.output.dense, layer.output.LayerNorm)


def _distilbert_parts(layer) -> LayerParts:
    att, ffn = layer.attention, layer.ffn
    return LayerParts(att.q_lin, att.k_lin, att.v_lin, att.out_lin, layer.sa_layer_norm,
                      ffn.lin1, ffn.activation, ffn.lin2, layer.output_layer_norm)


def _mpnet_parts(layer) -> LayerParts:
    att = layer.attention.attn
    return LayerParts(att.q, att.k, att.v, att.o, layer.attention.LayerNorm,
                      layer.intermediate.dense, layer.intermediate.intermediate_act_fn,
                      layer.output.dense, layer.output.LayerNorm)


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

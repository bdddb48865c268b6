"""Module paths of BERT-family encoders: BERT (bert-base, MiniLM), RoBERTa, DistilBERT, MPNet.

All four are post-norm encoders with multi-head attention (no kv groups) and a two-projection FFN.
Every path into a Hugging Face module of these models lives in this file and in fast_path.py, whose
fused inference modules `install_fast_path` swaps in (BERT, RoBERTa, MPNet). MPNet shares one relative
position bias `[B, H, S, S]` across layers, so a slimmed MPNet layer keeps the indices of its heads
and slices that bias (`MPNetSdpaSelfAttention`); the indices are stored in config.json as
`relative_attention_heads_per_layer`. Hugging Face runs MPNet attention only eagerly (scores,
scale, bias add, mask add, softmax, a second matmul: six passes over a `[B, H, S, S]` tensor); the
same module through `scaled_dot_product_attention` with the bias as its additive mask is one fused
kernel, which on a GPU is most of the cost of a pruned layer. `compress.load` installs it.
DistilBERT has no fast path yet: its residual norms live inside TransformerBlock.forward.
"""

from __future__ import annotations

import torch
from torch import nn

from torch.nn import functional as F
from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

from compress.arch import fast_path
from compress.arch.base import Adapter, EmptyAttention, LayerParts


def _encoder_parts(att, qkv: tuple[str, str, str], heads: str, **rest) -> LayerParts:
    """LayerParts of a multi-head (no kv groups) layer whose self-attention module is `att`; `qkv` and
    `heads` name its projections and head count. A 0-head layer (EmptyAttention) has no q/k/v."""
    if isinstance(att, EmptyAttention):
        return LayerParts(q=None, k=None, v=None, num_heads=0, num_kv_heads=0, **rest)
    q, k, v = (getattr(att, name) for name in qkv)
    num_heads = getattr(att, heads)
    return LayerParts(q=q, k=k, v=v, num_heads=num_heads, num_kv_heads=num_heads, **rest)


class BertAdapter(Adapter):
    """BERT and RoBERTa (same layer layout; MiniLM is a BERT)."""

    def layer_modules(self):
        return list(self.model.base_model.encoder.layer)

    def layer_parts(self, layer):
        blk = self.layer_modules()[layer]
        return _encoder_parts(
            blk.attention.self, ("query", "key", "value"), "num_attention_heads",
            o=blk.attention.output.dense, ffn_in=(blk.intermediate.dense,), ffn_out=blk.output.dense,
            attn_norm=blk.attention.output.LayerNorm, ffn_norm=blk.output.LayerNorm,
        )

    def head_dim(self):
        return self.config.hidden_size // self.config.num_attention_heads

    def _set_layer_shape(self, layer, num_heads, num_kv_heads):
        blk = self.layer_modules()[layer]
        if num_heads == 0:
            if not isinstance(blk.attention.self, EmptyAttention):
                blk.attention.self = EmptyAttention(self.hidden_size(), None, num_outputs=2).train(blk.training)
            return
        blk.attention.self.num_attention_heads = num_heads
        blk.attention.self.all_head_size = num_heads * self.head_dim()

    def install_fast_path(self):
        for blk in self.layer_modules():
            fast_path.fuse_qkv(blk.attention.self)
            blk.attention.output = fast_path.add_norm_output(blk.attention.output)
            blk.output = fast_path.add_norm_output(blk.output)
            fast_path.link_ffn(blk)

    def classifier_prefixes(self):
        return ("classifier.",)


class DistilBertAdapter(Adapter):
    def layer_modules(self):
        return list(self.model.base_model.transformer.layer)

    def layer_parts(self, layer):
        blk = self.layer_modules()[layer]
        return _encoder_parts(
            blk.attention, ("q_lin", "k_lin", "v_lin"), "n_heads",
            o=blk.attention.out_lin, ffn_in=(blk.ffn.lin1,), ffn_out=blk.ffn.lin2,
            attn_norm=blk.sa_layer_norm, ffn_norm=blk.output_layer_norm,
        )

    def head_dim(self):
        return self.config.dim // self.config.n_heads

    def _set_layer_shape(self, layer, num_heads, num_kv_heads):
        blk = self.layer_modules()[layer]
        if num_heads == 0:
            if not isinstance(blk.attention, EmptyAttention):
                blk.attention = EmptyAttention(self.hidden_size(), blk.attention.out_lin, 2,
                                               o_name="out_lin").train(blk.training)
            return
        blk.attention.n_heads = num_heads

    def _config_filters(self):
        return self.config.hidden_dim

    def classifier_prefixes(self):
        return ("classifier.", "pre_classifier.")


class MPNetSdpaSelfAttention(MPNetSelfAttention):
    """MPNet self-attention through SDPA, for the heads `head_index` of the shared relative bias.

    The encoder computes that bias from the sequence length alone (no position ids), so its batch
    rows are equal: one row is sliced and broadcast. The eager parent runs with `output_attentions`
    (SDPA returns no probabilities) and on devices outside SDPA_DEVICES: on CPU, PyTorch's SDPA with
    an additive mask measured 15% slower than the eager path (MPNet-base, batch 8, 2 cores). On the
    encoder fast path (compress/arch/fast_path.py) Q, K and V come from one GEMM."""

    SDPA_DEVICES = ("cuda",)

    def __init__(self, inner: MPNetSelfAttention, head_index):
        nn.Module.__init__(self)
        self.num_attention_heads, self.attention_head_size = inner.num_attention_heads, inner.attention_head_size
        self.all_head_size = inner.all_head_size
        self.q, self.k, self.v, self.o, self.dropout = inner.q, inner.k, inner.v, inner.o, inner.dropout
        self.register_buffer("head_index", torch.as_tensor(head_index, dtype=torch.long), persistent=False)
        self.training = inner.training  # a fresh Module is in training mode: SDPA would apply dropout
        fast_path.register_qkv_buffers(self)

    def forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
        if position_bias is not None:
            position_bias = position_bias[:1, self.head_index.to(position_bias.device)]
        if output_attentions or hidden_states.device.type not in self.SDPA_DEVICES:
            return super().forward(hidden_states, attention_mask, position_bias, output_attentions)
        q, k, v = self._project(hidden_states)  # [B, H, S, D] each
        b, s, _ = hidden_states.shape
        bias = _additive(attention_mask, q.dtype)
        if position_bias is not None:
            bias = position_bias if bias is None else position_bias + bias
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                                 dropout_p=self.dropout.p if self.training else 0.0)
        return (self.o(context.transpose(1, 2).reshape(b, s, self.all_head_size)),)

    def _project(self, hidden_states):
        projections = (self.q, self.k, self.v)
        if fast_path.fused_qkv_applies(self, hidden_states, projections):
            return fast_path.fused_qkv(self, hidden_states, projections, self.attention_head_size)
        shape = (*hidden_states.shape[:-1], self.num_attention_heads, self.attention_head_size)
        return tuple(proj(hidden_states).view(shape).transpose(1, 2) for proj in projections)


def _additive(mask, dtype):
    """An attention mask as an additive float mask (transformers versions pass bool or float)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class MPNetAdapter(Adapter):
    def layer_modules(self):
        return list(self.model.base_model.encoder.layer)

    def layer_parts(self, layer):
        blk = self.layer_modules()[layer]
        return _encoder_parts(
            blk.attention.attn, ("q", "k", "v"), "num_attention_heads",
            o=blk.attention.attn.o, ffn_in=(blk.intermediate.dense,), ffn_out=blk.output.dense,
            attn_norm=blk.attention.LayerNorm, ffn_norm=blk.output.LayerNorm,
        )

    def head_dim(self):
        return self.config.hidden_size // self.config.num_attention_heads

    def _set_layer_shape(self, layer, num_heads, num_kv_heads):
        blk = self.layer_modules()[layer]
        if num_heads == 0:
            if not isinstance(blk.attention.attn, EmptyAttention):
                blk.attention.attn = EmptyAttention(self.hidden_size(), blk.attention.attn.o,
                                                    num_outputs=1).train(blk.training)
            return
        blk.attention.attn.num_attention_heads = num_heads
        blk.attention.attn.all_head_size = num_heads * self.head_dim()

    def _after_slim_layer(self, layer, keep_heads):
        blk = self.layer_modules()[layer]
        att = blk.attention.attn
        if isinstance(att, EmptyAttention):
            return
        old = getattr(att, "head_index", torch.arange(self.config.num_attention_heads))
        blk.attention.attn = MPNetSdpaSelfAttention(att, old[keep_heads])

    def install_fast_path(self):
        for blk in self.layer_modules():
            att = blk.attention.attn
            if not isinstance(att, (EmptyAttention, MPNetSdpaSelfAttention)):
                blk.attention.attn = MPNetSdpaSelfAttention(att, torch.arange(att.num_attention_heads))
            blk.attention = fast_path.mpnet_add_norm_attention(blk.attention)
            blk.output = fast_path.add_norm_output(blk.output)
            fast_path.link_ffn(blk)

    def record_shapes(self):
        super().record_shapes()
        index = [self._head_index(i) for i in range(self.num_layers)]
        full = list(range(self.config.num_attention_heads))
        value = None if all(ix == full for ix in index) else index
        if value is not None:
            self.config.relative_attention_heads_per_layer = value
        elif hasattr(self.config, "relative_attention_heads_per_layer"):
            delattr(self.config, "relative_attention_heads_per_layer")

    def _head_index(self, layer):
        att = self.layer_modules()[layer].attention.attn
        if isinstance(att, EmptyAttention):
            return []
        return getattr(att, "head_index", torch.arange(att.num_attention_heads)).tolist()

    def resize_to_config(self):
        index = getattr(self.config, "relative_attention_heads_per_layer", None)
        if index is None:
            return super().resize_to_config()
        for i in range(self.num_layers):
            filters = (getattr(self.config, "intermediate_size_per_layer", None) or self.num_filters())[i]
            self.slim_layer(i, torch.as_tensor(index[i], dtype=torch.long), torch.arange(filters))

    def classifier_prefixes(self):
        return ("classifier.",)

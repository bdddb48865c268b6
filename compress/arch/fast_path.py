"""The inference fast path of the BERT-family encoders (BERT, MiniLM, RoBERTa, MPNet) on a GPU.

Two fusions, installed by the adapters' `install_fast_path` (compress.arch.bert), which
`compress.load` and evals/encoder_latency.py call:
- residual add + LayerNorm: every layer ends both branches with `LayerNorm(dropout(branch) + x)`; with
  dropout a no-op in eval mode, `kernels.add_layer_norm` does the add and the norm in one pass
  (PyTorch: an add kernel and a norm kernel, 5 passes over [tokens, hidden] instead of 3);
- Q, K and V as one GEMM over the concatenated weights [3 * heads * head_dim, hidden]; q, k and v are
  views of its output. A GEMM has a fixed cost that small pruned layers (1-3 heads) pay three times:
  on the H100 (MPNet-base, batch 32 x 128, bf16) the three cost 355 us per forward against 292 us
  fused for the dense model, ~300 against 219 us for a FLOPs-0.5 slimmed one.

- a narrow FFN (at most NARROW_FFN_MAX_FILTERS filters, as pruning leaves many late layers) with its
  residual add and LayerNorm as one kernel, `kernels.ffn_add_layer_norm`: the layer's intermediate
  module hands its input through (FusableIntermediate) and its output module runs the whole block.
  At these widths cuBLAS costs what the [tokens, hidden] traffic costs, not the arithmetic: 16.2 us for
  the block and the add + norm at 8 to 64 filters (MPNet-base, batch 32 x 128, bf16, H200), 11-13.5 us
  as one kernel (evals/results/encoder_ffn.md); from 128 filters on the two are level.

A projection with no inputs (the output projection of a layer with 0 heads) costs cuBLAS two
elementwise passes that materialise its bias over every token (13 us per layer on MPNet-base, batch
32 x 128, bf16, H100); `project` returns a broadcast view of the bias instead, which the add + norm
kernel reads with a row stride of 0.

All of these run only where `fast_path_applies`: a FAST_DEVICES device (CUDA only: the gains are in launch
counts and memory passes of a GPU, and elsewhere the kernels would run as their torch twins), eval
mode, no autograd through the inputs or weights, no autocast, matching dtypes, and no forward hooks on
the modules a fusion would skip (a LayerNorm whose call the add+norm kernel replaces, the q/k/v
Linears: mask tuning and activation statistics hook them). Everywhere else the
modules run the unfused ops of the Hugging Face forward, in the same order. The modules keep
their submodule names, so a model's state dict (and what `save_pretrained` writes) is unchanged; the
concatenated QKV weight is a non-persistent buffer, built on the first fused forward and rebuilt
when q, k or v change (replaced, moved, cast or modified in place). It costs one more copy of the
QKV weights in memory. Nothing here syncs with the host, so a forward stays CUDA-graph capturable.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules import module as torch_module
from transformers.activations import GELUActivation
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertSelfAttention, eager_attention_forward
from transformers.models.mpnet.modeling_mpnet import MPNetAttention
from transformers.models.roberta.modeling_roberta import RobertaSelfAttention

from compress import kernels  # the dispatcher only: triton is imported once a Triton op is first called
from compress.arch.hf_compat import kv_cache, without_cache

FAST_DEVICES = ("cuda",)
MAX_NORM_HIDDEN = 8192  # kernels/layer_norm.py keeps a row in registers (its MAX_HIDDEN)
# FFN blocks up to this many filters run as one kernel (at most kernels/ffn.py's MAX_FILTERS); wider
# ones are cuBLAS's, whose arithmetic rate the fused kernel does not reach. Chosen from the `+norm` and
# `fused` columns of evals/bench_encoder_ffn.py (evals/results/encoder_ffn.md).
NARROW_FFN_MAX_FILTERS = 64
NARROW_FFN_DTYPES = (torch.bfloat16, torch.float16)  # the kernel's tl.dot would run fp32 as TF32


def fast_path_applies(module: nn.Module, x: torch.Tensor, *tensors) -> bool:
    """Whether `module` may run its fused inference ops on input `x` (and weights `tensors`)."""
    if module.training or x.device.type not in FAST_DEVICES or torch.is_autocast_enabled(x.device.type):
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, *tensors))


def hooked(module: nn.Module) -> bool:
    """Whether a forward hook (the module's own or a global one) expects to see `module` called."""
    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def residual_layer_norm(module: nn.Module, norm: nn.Module, dropout: nn.Module, x, residual):
    """norm(dropout(x) + residual), in one kernel on the fast path (dropout is the identity there)."""
    if _fusable_norm(module, norm, x, residual):
        return kernels.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)
    return norm(dropout(x) + residual)


def _fusable_norm(module, norm, x, residual) -> bool:
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
        return False
    if len(norm.normalized_shape) != 1 or x.shape[-1] > MAX_NORM_HIDDEN or x.shape != residual.shape:
        return False
    if not x.dtype == residual.dtype == norm.weight.dtype == norm.bias.dtype or hooked(norm):
        return False
    return fast_path_applies(module, x, residual, norm.weight, norm.bias)


def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x); when `linear` has no inputs (in_features 0) its output is its bias on every row, which
    the fast path returns as a broadcast view (no launch, no copy). A hooked `linear` is called."""
    if linear.in_features == 0 and not hooked(linear) and fast_path_applies(linear, x, linear.weight, linear.bias):
        bias = linear.bias if linear.bias is not None else x.new_zeros(linear.out_features)
        if bias.dtype == x.dtype:
            return bias.expand(*x.shape[:-1], linear.out_features)
    return linear(x)


class AddNormOutput(nn.Module):
    """A BERT-style output sublayer, `LayerNorm(dropout(dense(h)) + input)` (BertSelfOutput, BertOutput,
    their RoBERTa twins, MPNetOutput), with the add and the norm fused on the fast path. The FFN's output
    sublayer, linked to its FusableIntermediate (`link_ffn`), runs a narrow FFN whole when that module
    handed its input through."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.dense, self.dropout, self.LayerNorm = inner.dense, inner.dropout, inner.LayerNorm
        self.training = inner.training
        self.__dict__["intermediate"] = None  # a plain attribute: not a submodule, the state dict stays

    def forward(self, hidden_states, input_tensor):
        inter = self.intermediate
        if hidden_states is input_tensor and inter is not None and narrow_ffn_applies(inter, self, input_tensor):
            return kernels.ffn_add_layer_norm(input_tensor, inter.dense.weight, inter.dense.bias, self.dense.weight,
                                              self.dense.bias, self.LayerNorm.weight, self.LayerNorm.bias,
                                              self.LayerNorm.eps)
        hidden_states = project(self.dense, hidden_states)
        return residual_layer_norm(self, self.LayerNorm, self.dropout, hidden_states, input_tensor)


def add_norm_output(inner: nn.Module) -> nn.Module:
    return inner if isinstance(inner, AddNormOutput) else AddNormOutput(inner)


class FusableIntermediate(nn.Module):
    """A BERT-style FFN input sublayer, `act(dense(x))` (BertIntermediate, its RoBERTa twin,
    MPNetIntermediate), that on the fast path hands x through untouched when its FFN is narrow: the
    layer then passes x as both arguments of its output sublayer, which runs the block in one kernel.
    Both sides decide with `narrow_ffn_applies` on the same x, so they always agree."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.dense, self.intermediate_act_fn = inner.dense, inner.intermediate_act_fn
        self.training = inner.training
        self.__dict__["output"] = None

    def forward(self, hidden_states):
        if self.output is not None and narrow_ffn_applies(self, self.output, hidden_states):
            return hidden_states
        return self.intermediate_act_fn(self.dense(hidden_states))


def link_ffn(layer: nn.Module) -> None:
    """Make `layer.intermediate` and `layer.output` (an AddNormOutput) one fusable FFN block."""
    if not isinstance(layer.intermediate, FusableIntermediate):
        layer.intermediate = FusableIntermediate(layer.intermediate)
    layer.intermediate.__dict__["output"] = layer.output
    layer.output.__dict__["intermediate"] = layer.intermediate


def narrow_ffn_applies(inter: FusableIntermediate, out: AddNormOutput, x: torch.Tensor) -> bool:
    """Whether the FFN block (inter, out) runs as one `kernels.ffn_add_layer_norm` on input x."""
    act, ffn_in, ffn_out = inter.intermediate_act_fn, inter.dense, out.dense
    if inter.output is not out or out.intermediate is not inter or x.dtype not in NARROW_FFN_DTYPES:
        return False
    if type(act) is not GELUActivation or act.act is not F.gelu:  # the exact GELU (hidden_act "gelu")
        return False
    filters, hidden = ffn_in.weight.shape
    if not 0 < filters <= NARROW_FFN_MAX_FILTERS or hidden % 64 or ffn_out.weight.shape != (hidden, filters):
        return False
    if ffn_in.bias is None or ffn_out.bias is None or any(hooked(m) for m in (inter, act, ffn_in, ffn_out)):
        return False
    tensors = (ffn_in.weight, ffn_in.bias, ffn_out.weight, ffn_out.bias)
    return all(t.dtype == x.dtype for t in tensors) and _fusable_norm(out, out.LayerNorm, x, x) and \
        fast_path_applies(out, x, *tensors)


class MPNetAddNormAttention(MPNetAttention):
    """MPNetAttention (self-attention, then `LayerNorm(dropout(out) + input)`) with the add and the norm
    fused on the fast path. `attn` may be any of its forms: eager, SDPA, or 0 heads (EmptyAttention)."""

    def __init__(self, inner: MPNetAttention):
        nn.Module.__init__(self)
        self.attn, self.LayerNorm, self.dropout = inner.attn, inner.LayerNorm, inner.dropout
        self.training = inner.training

    def forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
        outputs = self.attn(hidden_states, attention_mask, position_bias, output_attentions=output_attentions)
        out = residual_layer_norm(self, self.LayerNorm, self.dropout, outputs[0], hidden_states)
        return (out,) + tuple(outputs[1:])


def mpnet_add_norm_attention(inner: MPNetAttention) -> MPNetAttention:
    return inner if isinstance(inner, MPNetAddNormAttention) else MPNetAddNormAttention(inner)


# --- fused QKV ------------------------------------------------------------------------------------
def fused_qkv_applies(module: nn.Module, hidden_states, projections) -> bool:
    if any(hooked(p) for p in projections):
        return False
    return fast_path_applies(module, hidden_states, *(t for p in projections for t in (p.weight, p.bias)))


def fused_qkv(module: nn.Module, hidden_states, projections, head_dim: int):
    """hidden_states [B, S, hidden] -> q, k, v [B, heads, S, head_dim] from one GEMM: views of its
    [B, S, 3 * heads * head_dim] output, strided like the views the three separate projections give."""
    weight, bias = _concatenated(module, projections)
    qkv = F.linear(hidden_states, weight, bias).view(*hidden_states.shape[:-1], 3, -1, head_dim)
    return tuple(qkv.select(-3, i).transpose(1, 2) for i in range(3))


def register_qkv_buffers(module: nn.Module) -> None:
    """Room for the concatenated weights on `module`, outside its state dict."""
    module.register_buffer("qkv_weight", None, persistent=False)
    module.register_buffer("qkv_bias", None, persistent=False)
    module.qkv_source = None


@torch.no_grad()
def _concatenated(module: nn.Module, projections) -> tuple[torch.Tensor, torch.Tensor | None]:
    """module's [q; k; v] weight and bias, concatenated again whenever a source tensor changed."""
    tensors = [t for p in projections for t in (p.weight, p.bias)]
    source = tuple(_identity(t) for t in tensors)
    if module.qkv_source != source:
        module.qkv_weight = torch.cat([p.weight for p in projections])
        biases = [p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projections]
        module.qkv_bias = None if all(p.bias is None for p in projections) else torch.cat(biases)
        module.qkv_source = source
    return module.qkv_weight, module.qkv_bias


def _identity(t: torch.Tensor | None):
    """What changes when a tensor is replaced, moved, cast or written in place (host-side, no sync)."""
    if t is None:
        return None
    version = 0 if t.is_inference() else t._version  # inference tensors keep no version counter
    return id(t), t.data_ptr(), version, t.dtype, t.device, tuple(t.shape)


class FusedQKVSelfAttention:
    """BERT/RoBERTa self-attention whose Q, K, V projections run as one GEMM on the fast path; the rest
    is the Hugging Face forward (its attention interface, its mask). Mixed in front of the HF class and
    set as an instance's class (`fuse_qkv`), so the instance keeps every attribute and parameter."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        projections = (self.query, self.key, self.value)
        if (kv_cache(kwargs) is not None or kwargs.get("encoder_hidden_states") is not None
                or not fused_qkv_applies(self, hidden_states, projections)):
            return super().forward(hidden_states, attention_mask=attention_mask, **kwargs)
        q, k, v = fused_qkv(self, hidden_states, projections, self.attention_head_size)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, probs = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                               **without_cache(kwargs))
        return out.reshape(*hidden_states.shape[:-1], -1).contiguous(), probs


class BertFusedQKVSelfAttention(FusedQKVSelfAttention, BertSelfAttention):
    pass


class RobertaFusedQKVSelfAttention(FusedQKVSelfAttention, RobertaSelfAttention):
    pass


FUSED_QKV_CLASSES = {BertSelfAttention: BertFusedQKVSelfAttention,
                     RobertaSelfAttention: RobertaFusedQKVSelfAttention}


def fuse_qkv(attention: nn.Module) -> nn.Module:
    """`attention` as its fused-QKV subclass (the same object); other classes (0 heads, cross-attention,
    already fused) are returned unchanged."""
    fused = FUSED_QKV_CLASSES.get(type(attention))
    if fused is not None:
        attention.__class__ = fused
        register_qkv_buffers(attention)
    return attention

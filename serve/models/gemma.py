"""The runtime's own Gemma 2 / Gemma 3 text decoder over packed tokens and a paged KV cache.

Inputs are packed: `input_ids [T]`, `positions [T]` for all sequences of a step; attention goes
through the backend with explicit metadata (serve/attention.py). Numerics follow Hugging Face:
embedding times sqrt(hidden) rounded to the compute dtype; RMSNorm in fp32 with (1 + weight); four
norms per layer; scale query_pre_attn_scalar ** -0.5; attention and final-logit tanh soft-capping;
Gemma 3 QK-norm and separate RoPE bases for sliding (local) and full (global) layers; tanh-GELU GeGLU;
tied embeddings. Layer shapes come per layer from `GemmaSpec` (slimmed models are uneven; a layer with
0 heads contributes only its output bias, one with 0 filters only zeros). A layer with 0 heads, 0 filters and
no bias (depth pruning, compress.pruning.depth) is the identity on the residual stream, each branch adding
post_norm(0) = 0, so both paths skip it (`GemmaForCausalLM.layer_ids`): it costs no launch at all.

Fast path (`GemmaForCausalLM.fuse`, used on the GPU): q/k/v and gate/up become one GEMM each; a
branch's post-norm, the residual add and the next pre-norm run as one kernel (kernels.rms_norm_pair:
two norm launches per layer, the last layer's pairs with the final norm), and one kernel applies
Gemma 3's QK-norm and RoPE (a precomputed fp32 cos|sin table) to q in place and to k on its way into
the paged cache, v beside it (kernels.rotary_and_cache; the backend is told the KV is written). With at most
kernels.GEMV_MAX_TOKENS tokens (batch-1 decode today, its CUDA graph included) the projections and
the lm_head run as GEMV kernels that read each weight once, and GeGLU's GELU and product happen inside
the gate|up GEMV (kernels.gelu_tanh_and_mul_gemv). Same function, fewer launches and bytes: a decode
step of a 2B model is otherwise dominated by ~15 tiny elementwise kernels per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress import kernels

from serve.attention import AttentionBackend, AttentionMetadata
from serve.models.gemma_config import GemmaSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).type_as(x)

    def fused(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x) or, with a residual, (norm(x + residual), x + residual) in one kernel."""
        return kernels.rms_norm(x, self.weight, self.eps, residual=residual)


def concat_linear(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the concatenation of `linears`' outputs (their weights moved, not copied twice)."""
    first = linears[0]
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                      device="meta")
    fused.weight = nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=False)
    return fused


def few_tokens(x: torch.Tensor) -> bool:
    """Whether x [T, K] is small enough for the GEMV kernels (weights read once for all rows)."""
    return x.shape[0] <= kernels.GEMV_MAX_TOKENS


def linear_fast(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """linear(x) on the fast path: a GEMV kernel for few tokens, the GEMM otherwise."""
    if not few_tokens(x):
        return F.linear(x, linear.weight, linear.bias)
    y = kernels.linear_small_m(x, linear.weight)
    return y if linear.bias is None else y + linear.bias


def rope_table(max_len: int, head_dim: int, theta: float, factor: float, device) -> torch.Tensor:
    """cos | sin [max_len, D] fp32 for kernels.rotary_and_cache, the same fp32 angles as rope_cos_sin."""
    positions = torch.arange(max_len, device=device)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    freqs = positions.float()[:, None] * (inv_freq / factor)[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, factor: float, dtype):
    """cos, sin [T, D] in the HF layout (frequencies repeated twice), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * (inv_freq / factor)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class GemmaAttention(nn.Module):
    def __init__(self, spec: GemmaSpec, layer: int):
        super().__init__()
        hidden, d = spec.hidden_size, spec.head_dim
        self.num_heads = spec.num_attention_heads[layer]
        self.num_kv_heads = spec.num_key_value_heads[layer]
        self.head_dim = d
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=spec.attention_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=spec.attention_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=spec.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=spec.attention_bias)
        # A layer pruned to 0 heads has no QK-norm weights on disk (compress drops its attention modules).
        self.qk_norm = spec.qk_norm and self.num_heads > 0
        if self.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        self.scale = spec.query_pre_attn_scalar ** -0.5
        self.sliding_window = spec.sliding_windows[layer]
        self.softcap = spec.attn_logit_softcapping

    def forward(self, x, cos, sin, meta: AttentionMetadata, kv_cache, backend: AttentionBackend):
        num_tokens = x.shape[0]
        if self.num_heads == 0:
            return self.o_proj(x.new_zeros(num_tokens, 0))
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)        # [T, Hq, D]
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)     # [T, Hkv, D]
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.sliding_window,
                              scale=self.scale, sliding_window=self.sliding_window, softcap=self.softcap)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))

    def fuse(self) -> None:
        if self.num_heads > 0:
            self.qkv_proj = concat_linear(self.q_proj, self.k_proj, self.v_proj)
            del self.q_proj, self.k_proj, self.v_proj

    def forward_fused(self, x, positions, rope, meta: AttentionMetadata, kv_cache, backend):
        num_tokens, d = x.shape[0], self.head_dim
        if self.num_heads == 0:
            return self.o_proj(x.new_zeros(num_tokens, 0))
        widths = [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]
        q, k, v = linear_fast(x, self.qkv_proj).split(widths, -1)
        q = q.view(num_tokens, self.num_heads, d)               # [T, Hq, D], a strided view of qkv
        k = k.view(num_tokens, self.num_kv_heads, d)            # [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, d)
        # QK-norm (Gemma 3), RoPE on q in place and on k on its way into the cache, v beside it: one launch
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else ()
        kernels.rotary_and_cache(positions, q, k, v, kv_cache[0], kv_cache[1],
                                 meta.groups[self.sliding_window].slot_mapping, rope, *norms)
        out = backend.forward(q, None, None, kv_cache[0], kv_cache[1], meta, self.sliding_window,
                              scale=self.scale, sliding_window=self.sliding_window, softcap=self.softcap,
                              kv_written=True)
        return linear_fast(out.reshape(num_tokens, self.num_heads * d), self.o_proj)


class GemmaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))

    def fuse(self) -> None:
        self.gate_up_proj = concat_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward_fused(self, x):
        if few_tokens(x):
            return linear_fast(kernels.gelu_tanh_and_mul_gemv(x, self.gate_up_proj.weight), self.down_proj)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, spec: GemmaSpec, layer: int):
        super().__init__()
        hidden, eps = spec.hidden_size, spec.rms_norm_eps
        self.self_attn = GemmaAttention(spec, layer)
        self.mlp = GemmaMLP(hidden, spec.intermediate_size[layer])
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)

    def forward(self, x, cos, sin, meta, kv_cache, backend):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache, backend)
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def forward_fused(self, h, residual, next_norm: RMSNorm, positions, rope, meta, kv_cache, backend):
        """h: this layer's normed input, residual: the stream. Returns (next_norm(stream), stream) after this
        layer; each branch's post-norm, residual add and the following pre-norm are one kernel."""
        attn = self.self_attn.forward_fused(h, positions, rope, meta, kv_cache, backend)
        pre_ffn = self.pre_feedforward_layernorm
        # the stream was written by the previous norm, a whole branch before: settled (loaded early under PDL)
        h, residual = kernels.rms_norm_pair(attn, self.post_attention_layernorm.weight, pre_ffn.weight,
                                            pre_ffn.eps, residual, residual_settled=True)
        return kernels.rms_norm_pair(self.mlp.forward_fused(h), self.post_feedforward_layernorm.weight,
                                     next_norm.weight, next_norm.eps, residual, residual_settled=True)


def is_identity_layer(spec: GemmaSpec, layer: int) -> bool:
    """Whether `layer` leaves the residual stream unchanged: no heads, no filters, no output bias."""
    return spec.num_attention_heads[layer] == 0 and spec.intermediate_size[layer] == 0 and not spec.attention_bias


class GemmaModel(nn.Module):
    def __init__(self, spec: GemmaSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(spec, i) for i in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class GemmaForCausalLM(nn.Module):
    """Parameter names match the HF checkpoint (`model.layers.N...`, `lm_head` when untied)."""

    def __init__(self, spec: GemmaSpec):
        super().__init__()
        self.spec = spec
        self.model = GemmaModel(spec)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rope_tables: dict | None = None     # set by fuse(): the fast path is on
        self.layer_ids = [i for i in range(spec.num_hidden_layers) if not is_identity_layer(spec, i)]

    def fuse(self, max_model_len: int) -> None:
        """Switch to the fast path: fused projections, fused-norm kernels, a RoPE table per base."""
        for i in self.layer_ids:    # the skipped layers are never run
            self.model.layers[i].self_attn.fuse()
            self.model.layers[i].mlp.fuse()
        device = self.model.embed_tokens.weight.device
        self.rope_tables = {key: rope_table(max_model_len, self.spec.head_dim, *key, device)
                            for key in zip(self.spec.rope_theta, self.spec.rope_linear_factor)}

    def _embed_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """sqrt(hidden) rounded to the activation dtype, as Hugging Face's Gemma scales its embeddings."""
        return torch.tensor(self.spec.hidden_size ** 0.5, dtype=dtype)

    def _embed(self, input_ids):
        x = self.model.embed_tokens(input_ids)
        return x * self._embed_scale(x.dtype)

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches: list, backend,
                src_rows=None, prev_tokens=None) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]. On the fast path, a row i with
        src_rows[i] >= 0 takes its input token from prev_tokens[src_rows[i]] (device-side, for a decode
        step launched before the host has the previous step's tokens: serve/cuda_graphs.py)."""
        if self.rope_tables is not None:
            return self._forward_fused(input_ids, positions, meta, kv_caches, backend, src_rows, prev_tokens)
        if src_rows is not None:
            raise ValueError("src_rows needs the fast path (fuse())")
        x = self._embed(input_ids)
        rope = {}
        for i in self.layer_ids:
            key = (self.spec.rope_theta[i], self.spec.rope_linear_factor[i])
            if key not in rope:
                rope[key] = rope_cos_sin(positions, self.spec.head_dim, *key, x.dtype)
            x = self.model.layers[i](x, *rope[key], meta, kv_caches[i], backend)
        return self.model.norm(x)

    def _forward_fused(self, input_ids, positions, meta, kv_caches, backend, src_rows, prev_tokens) -> torch.Tensor:
        layers, ids = self.model.layers, self.layer_ids
        first_norm = layers[ids[0]].input_layernorm if ids else self.model.norm
        table = self.model.embed_tokens.weight
        scale = self._embed_scale(table.dtype).item()
        h, residual = kernels.embed_rms_norm(input_ids, table, scale, first_norm.weight, first_norm.eps,
                                             src_rows=src_rows, prev_tokens=prev_tokens)
        for n, i in enumerate(ids):
            rope = self.rope_tables[(self.spec.rope_theta[i], self.spec.rope_linear_factor[i])]
            next_norm = layers[ids[n + 1]].input_layernorm if n + 1 < len(ids) else self.model.norm
            h, residual = layers[i].forward_fused(h, residual, next_norm, positions, rope, meta, kv_caches[i],
                                                  backend)
        return h

    def compute_logits(self, hidden: torch.Tensor, argmax_out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, hidden] -> fp32 logits [N, vocab], soft-capped when the config says so; with
        `argmax_out` (int64 [N]) their argmax is written there too (by the logits kernel where it runs)."""
        weight = self.lm_head.weight if hasattr(self, "lm_head") else self.model.embed_tokens.weight
        cap = self.spec.final_logit_softcapping
        if self.rope_tables is not None and few_tokens(hidden):    # fast path, decode at small batch
            if kernels.fused_logits():   # product, fp32, soft-cap and argmax: one launch and a finish
                return kernels.logits_small_m(hidden, weight, cap, argmax_out=argmax_out)
            logits = kernels.linear_small_m(hidden, weight).float()
        else:
            logits = F.linear(hidden, weight).float()
        logits = logits if cap is None else cap * torch.tanh(logits / cap)
        if argmax_out is not None:
            torch.argmax(logits, dim=1, out=argmax_out)
        return logits

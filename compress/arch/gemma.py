"""Module paths of Gemma 2 and Gemma 3 decoders, the GQA rule, and loading slimmed Gemma checkpoints.

Layer layout (HF `Gemma2ForCausalLM`, `Gemma3ForCausalLM`, and the text tower of
`Gemma3ForConditionalGeneration`): `self_attn.{q,k,v,o}_proj` with grouped-query attention
(query head h reads kv head `h // (H / Hkv)`), `head_dim` independent of `hidden_size`, Gemma 3's
QK-norm over head_dim (shared by all heads, so it needs no slicing); a gated MLP whose filters are
rows of `gate_proj` and `up_proj` and columns of `down_proj`; sandwich norms. The reconstruction
points for mask tuning are the inputs of `post_attention_layernorm` and `post_feedforward_layernorm`,
i.e. each branch's output before its post-norm.

GQA rule. HF attention (and the paged kernels) use one group size per layer, so a slimmed layer
keeps `Hkv'` kv heads and the same number `g'` of query heads in each of them: its query-head count
`H' = g' * Hkv'` is a multiple of its kv-head count. A kv head goes when all its query heads go
(a "whole KV group", which also saves its K/V projections and KV cache). Feasible layer shapes are
therefore (g', Hkv') with 1 <= g' <= H/Hkv and 0 <= Hkv' <= Hkv (plus the empty layer); the search
(`compress.pruning.gqa`) picks, per layer, the shape and the heads in it that keep the most Fisher score for
the cost, so whole groups are removed exactly where that is cheaper for the same loss. Gemma 3
270M and 1B have one kv head: any query-head count is feasible, and 0 removes the kv head too.

Shapes on disk: `num_attention_heads_per_layer`, `num_key_value_heads_per_layer` and
`intermediate_size_per_layer` in config.json (present only when uneven); a layer with 0 heads
keeps an empty `o_proj` and still appends empty K/V to the cache so sequence lengths stay right.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.arch.base import Adapter, LayerParts
from compress.arch.hf_compat import kv_cache

MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3")


class GemmaEmptyAttention(nn.Module):
    """Attention of a layer with 0 heads: outputs zeros (Gemma has no o_proj bias), keeps the cache in step."""

    def __init__(self, o_proj: nn.Linear, layer_idx: int, head_dim: int, sliding_window: int | None):
        super().__init__()
        self.o_proj, self.layer_idx, self.head_dim = o_proj, layer_idx, head_dim
        self.sliding_window = sliding_window
        self.num_key_value_groups = 1

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        b, s = hidden_states.shape[:2]
        cache = kv_cache(kwargs)
        if cache is not None:
            empty = hidden_states.new_zeros(b, 0, s, self.head_dim)  # [B, 0 heads, S, D]
            cache.update(empty, empty, self.layer_idx)
        return self.o_proj(hidden_states.new_zeros(b, s, 0)), None


class GemmaAdapter(Adapter):
    """Gemma 2 / Gemma 3 text decoders (causal LM, or the language model of the multimodal Gemma 3)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.config = text_config(model.config)

    def layer_modules(self):
        inner = self.model.model
        inner = getattr(inner, "language_model", inner)
        return list(inner.layers)

    def layer_parts(self, layer):
        blk = self.layer_modules()[layer]
        att = blk.self_attn
        empty = isinstance(att, GemmaEmptyAttention)
        heads = 0 if empty else att.q_proj.out_features // self.head_dim()
        kv = 0 if empty else att.k_proj.out_features // self.head_dim()
        return LayerParts(
            q=None if empty else att.q_proj, k=None if empty else att.k_proj, v=None if empty else att.v_proj,
            o=att.o_proj, ffn_in=(blk.mlp.gate_proj, blk.mlp.up_proj), ffn_out=blk.mlp.down_proj,
            attn_norm=blk.post_attention_layernorm, ffn_norm=blk.post_feedforward_layernorm,
            num_heads=heads, num_kv_heads=kv,
        )

    def head_dim(self):
        return self.config.head_dim

    def has_kv_groups(self):
        return True

    def sliding_windows(self) -> list[int | None]:
        """Per layer: the attention window in tokens (HF convention: it counts the current token) or None."""
        return [sliding_window(self.config, i) for i in range(self.num_layers)]

    def _set_layer_shape(self, layer, num_heads, num_kv_heads):
        blk = self.layer_modules()[layer]
        att = blk.self_attn
        if num_heads == 0:
            if not isinstance(att, GemmaEmptyAttention):
                blk.self_attn = GemmaEmptyAttention(att.o_proj, layer, self.head_dim(), att.sliding_window)
            return
        if num_heads % num_kv_heads:
            raise ValueError(f"layer {layer}: {num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
        att.num_key_value_groups = num_heads // num_kv_heads

    def classifier_prefixes(self):
        return ("lm_head.",)

    def final_hidden(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """`[B, S, hidden]` output of the final norm (what the LM head reads)."""
        return self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states, with Gemma 2's final soft-capping where the config has it."""
        logits = self.model.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return cap * torch.tanh(logits / cap) if cap else logits

    @torch.no_grad()
    def resize_to_config(self) -> None:
        """Give a freshly built uniform model the per-layer shapes in its config (before loading weights)."""
        if not any(hasattr(self.config, k) for k in SHAPE_KEYS):
            return
        heads, kv, filters = layer_shapes(self.config)
        for i in range(self.num_layers):
            self.slim_layer(i, layout_heads(heads[i], kv[i], self.config), torch.arange(filters[i]))
            if self.layer_parts(i).num_kv_heads != kv[i]:
                raise ValueError(f"layer {i}: config says {kv[i]} kv heads for {heads[i]} query heads")


def layer_shapes(config) -> tuple[list[int], list[int], list[int]]:
    """Per layer: query heads, kv heads and filters that a (possibly slimmed) config describes."""
    config, n = text_config(config), text_config(config).num_hidden_layers
    return (getattr(config, "num_attention_heads_per_layer", None) or [config.num_attention_heads] * n,
            getattr(config, "num_key_value_heads_per_layer", None) or [config.num_key_value_heads] * n,
            getattr(config, "intermediate_size_per_layer", None) or [config.intermediate_size] * n)


def layout_heads(num_heads: int, num_kv_heads: int, config) -> torch.Tensor:
    """Query-head indices of a fresh layer that give `num_kv_heads` groups of `num_heads / num_kv_heads`."""
    if num_heads == 0:
        return torch.zeros(0, dtype=torch.long)
    group = config.num_attention_heads // config.num_key_value_heads
    if num_kv_heads == 0 or num_heads % num_kv_heads or num_heads // num_kv_heads > group \
            or num_kv_heads > config.num_key_value_heads:
        raise ValueError(f"infeasible layer shape: {num_heads} query heads over {num_kv_heads} kv heads")
    per = num_heads // num_kv_heads
    return torch.tensor([g * group + t for g in range(num_kv_heads) for t in range(per)], dtype=torch.long)


def text_config(config):
    """The decoder's config (Gemma 3 multimodal models nest it as `text_config`)."""
    return getattr(config, "text_config", None) or config


def sliding_window(config, layer: int) -> int | None:
    """The window of `layer`, from `layer_types` or, in older configs, the sliding-window pattern."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if types[layer] == "sliding_attention" else None
    pattern = getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", None)
    if pattern:  # every pattern-th layer is global
        return None if (layer + 1) % pattern == 0 else window
    return window if config.model_type == "gemma2" and layer % 2 == 0 else None


def load_causal_lm(model_dir, dtype=torch.float32, device_map: dict | None = None):
    """A plain HF causal LM from a dense or slimmed directory (per-layer shapes applied before loading).
    `device_map` (module name: device): a dense checkpoint's weights load straight onto their devices; a
    slimmed one still loads on the CPU (compress.pruning.spread dispatches it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.errors import UserError
    from compress.models.checks import check_checkpoint

    check_checkpoint(model_dir, tokenizer=True)
    config = AutoConfig.from_pretrained(model_dir)
    if not any(hasattr(text_config(config), k) for k in SHAPE_KEYS):
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    GemmaAdapter(model).resize_to_config()
    _load_weights(model, model_dir, UserError)
    model.tie_weights()
    return model.eval()


SHAPE_KEYS = ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer")


def _load_weights(model, model_dir, error) -> None:
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise error(f"{model_dir} has no safetensors weights")
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as err:  # noqa: BLE001 (safetensors raises its own types for truncated or garbled files)
            raise error(f"checkpoint {f} is corrupt or incomplete ({str(err).splitlines()[0][:120]})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise error(f"weights in {model_dir} do not match its config.json: {str(err).splitlines()[1].strip()}") from None
    missing = [k for k in missing if not k.startswith("lm_head.")]  # tied to the embedding
    if missing or unexpected:
        raise error(f"weights in {model_dir} do not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")

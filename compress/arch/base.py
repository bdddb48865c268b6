"""Architecture adapter base: the generic half of the only code that knows module paths.

A subclass says where each layer's parts are (`LayerParts`); this base class does everything that
follows from that: installs head/filter masks as forward pre-hooks, slims a layer (drops heads and
filters, folds mask scales into weights) and rebuilds uneven layers when loading a slimmed model.

Mask conventions (shared with fisher/search/tune/slim): a head mask is a list of L tensors, layer l
of shape `[H_l]` or per-example `[B, H_l]`, over *query* heads; a filter mask is a list of L tensors
`[F_l]` or `[B, F_l]`. Grouped-query attention: query head h reads kv head `h // (H_l // Hkv_l)`;
a kv head is kept while any of its query heads is. Gated MLPs list several input projections
(gate, up); every one of them has one output row per filter. The reconstruction point of a branch
is the *input* of the norm that follows it (post-norm BERT: branch + residual; Gemma: the branch).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from compress.arch.fast_path import project


@dataclass
class LayerParts:
    """One transformer layer as the pruner sees it."""

    q: nn.Linear | None  # None once the layer has 0 heads
    k: nn.Linear | None
    v: nn.Linear | None
    o: nn.Linear  # input: concatenated heads [.., H*D]
    ffn_in: tuple[nn.Linear, ...]  # output rows = filters
    ffn_out: nn.Linear  # input columns = filters
    attn_norm: nn.Module  # its input is the attention reconstruction point
    ffn_norm: nn.Module
    num_heads: int
    num_kv_heads: int


class EmptyAttention(nn.Module):
    """An attention block with 0 heads: outputs the output-projection bias (or 0), shaped like the original."""

    def __init__(self, hidden_size: int, o: nn.Linear | None, num_outputs: int, o_name: str = "o"):
        super().__init__()
        self.hidden_size, self.num_outputs, self.o_name = hidden_size, num_outputs, o_name
        if o is not None:
            setattr(self, o_name, o)  # keeps the HF parameter name of the output projection

    def forward(self, hidden_states, *args, **kwargs):
        empty = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        o = getattr(self, self.o_name, None)
        out = project(o, empty) if o is not None else empty
        return (out,) + (None,) * (self.num_outputs - 1)


class Adapter:
    """Base adapter; subclasses implement `layer_parts`, `_set_layer_shape` and the config keys."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- what subclasses provide -------------------------------------------------------------
    def layer_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def layer_parts(self, layer: int) -> LayerParts:
        raise NotImplementedError

    def head_dim(self) -> int:
        raise NotImplementedError

    def _set_layer_shape(self, layer: int, num_heads: int, num_kv_heads: int) -> None:
        """Update head-count attributes and swap in `EmptyAttention` when `num_heads == 0`."""
        raise NotImplementedError

    def classifier_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the task head (to check that a model has one)."""
        raise NotImplementedError

    # --- shapes ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_modules())

    def num_heads(self) -> list[int]:
        return [self.layer_parts(i).num_heads for i in range(self.num_layers)]

    def num_kv_heads(self) -> list[int]:
        return [self.layer_parts(i).num_kv_heads for i in range(self.num_layers)]

    def num_filters(self) -> list[int]:
        return [self.layer_parts(i).ffn_out.in_features for i in range(self.num_layers)]

    def hidden_size(self) -> int:
        return self.layer_parts(0).o.out_features

    def head_devices(self) -> list[torch.device]:
        """Per layer, the device of its output projection, where its head mask scales activations (one device
        unless the model is spread over several, compress.pruning.spread)."""
        return [self.layer_parts(i).o.weight.device for i in range(self.num_layers)]

    def filter_devices(self) -> list[torch.device]:
        """Per layer, the device of its FFN output projection, where its filter mask scales activations."""
        return [self.layer_parts(i).ffn_out.weight.device for i in range(self.num_layers)]

    def ones_masks(self, device=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        heads = [torch.ones(h, device=device) for h in self.num_heads()]
        filters = [torch.ones(f, device=device) for f in self.num_filters()]
        return heads, filters

    # --- masks -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def masks(self, head_masks, filter_masks):
        """Multiply head outputs (before `o`) and filter activations (before `ffn_out`) by the masks."""
        handles = []
        try:
            for i in range(self.num_layers):
                parts = self.layer_parts(i)
                if head_masks is not None and parts.num_heads:
                    handles.append(parts.o.register_forward_pre_hook(_head_hook(head_masks[i], parts.num_heads)))
                if filter_masks is not None:
                    handles.append(parts.ffn_out.register_forward_pre_hook(_filter_hook(filter_masks[i])))
            yield self
        finally:
            for h in handles:
                h.remove()

    # --- slimming --------------------------------------------------------------------------
    @torch.no_grad()
    def slim_layer(self, layer: int, keep_heads, keep_filters, head_scale=None, filter_scale=None,
                   filter_multiple: int = 1) -> int:
        """Keep only the given heads/filters of `layer`; fold per-head/per-filter scales into `o`/`ffn_out`.

        With `filter_multiple` > 1 the FFN width is rounded up to a multiple of it with zero filters (a copy
        of a kept input row, a zero output column: the output is unchanged), because GEMMs whose inner
        dimension is not a multiple of 8 miss the fast tensor-core kernels. Returns the filters added."""
        parts, d = self.layer_parts(layer), self.head_dim()
        keep_heads = torch.as_tensor(keep_heads, dtype=torch.long).sort().values
        keep_filters = torch.as_tensor(keep_filters, dtype=torch.long).sort().values
        group = parts.num_heads // max(parts.num_kv_heads, 1)
        keep_kv = torch.unique(keep_heads // group) if len(keep_heads) else keep_heads
        q_rows, kv_rows = _head_rows(keep_heads, d), _head_rows(keep_kv, d)
        col_scale = None if head_scale is None else torch.as_tensor(head_scale).float()[keep_heads].repeat_interleave(d)
        if parts.q is not None:
            _keep_rows(parts.q, q_rows)
            for proj in (parts.k, parts.v):
                _keep_rows(proj, kv_rows)
        _keep_cols(parts.o, q_rows, col_scale)
        f_scale = None if filter_scale is None else torch.as_tensor(filter_scale).float()[keep_filters]
        pad = (-len(keep_filters)) % filter_multiple if len(keep_filters) else 0
        if pad:
            f_scale = torch.ones(len(keep_filters)) if f_scale is None else f_scale
            f_scale = torch.cat([f_scale, torch.zeros(pad)])
            keep_filters = torch.cat([keep_filters, keep_filters[:1].repeat(pad)])
        for proj in parts.ffn_in:
            _keep_rows(proj, keep_filters)
        _keep_cols(parts.ffn_out, keep_filters, f_scale)
        self._set_layer_shape(layer, len(keep_heads), len(keep_kv))
        self._after_slim_layer(layer, keep_heads)
        return pad

    def _after_slim_layer(self, layer: int, keep_heads: torch.Tensor) -> None:
        """Hook for architectures with per-head state outside the layer (e.g. MPNet's relative bias)."""

    def install_fast_path(self) -> None:
        """Swap in modules that compute the same function faster at inference (fused kernels, SDPA where
        the architecture's own attention is eager only), keeping the state dict; a no-op where the
        architecture has none. `compress.load` calls it."""

    def record_shapes(self) -> None:
        """Write per-layer shape keys into the config when the layers differ from its uniform sizes."""
        heads, kv, filters = self.num_heads(), self.num_kv_heads(), self.num_filters()
        uniform = set(heads) == {self._config_heads()} and set(filters) == {self._config_filters()}
        _set_or_clear(self.config, "num_attention_heads_per_layer", None if uniform else heads)
        _set_or_clear(self.config, "intermediate_size_per_layer", None if uniform else filters)
        if self.has_kv_groups():
            _set_or_clear(self.config, "num_key_value_heads_per_layer", None if uniform else kv)

    def has_kv_groups(self) -> bool:
        return False

    def _config_heads(self) -> int:
        return self.config.num_attention_heads

    def _config_filters(self) -> int:
        return self.config.intermediate_size

    @torch.no_grad()
    def resize_to_config(self) -> None:
        """Give freshly built (uniform) layers the per-layer shapes the config records, before loading weights."""
        heads = getattr(self.config, "num_attention_heads_per_layer", None)
        filters = getattr(self.config, "intermediate_size_per_layer", None)
        kv = getattr(self.config, "num_key_value_heads_per_layer", None) or heads
        if heads is None and filters is None:
            return
        for i in range(self.num_layers):
            h = heads[i] if heads else self.layer_parts(i).num_heads
            f = filters[i] if filters else self.num_filters()[i]
            self.slim_layer(i, torch.arange(h), torch.arange(f))
            if kv is not heads and kv[i] != self.layer_parts(i).num_kv_heads:
                raise ValueError("kv head counts disagree with query head counts")


def _set_or_clear(config, key: str, value) -> None:
    if value is not None:
        setattr(config, key, value)
    elif hasattr(config, key):
        delattr(config, key)


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[rows].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[rows].clone())
    linear.out_features = len(rows)


def _keep_cols(linear: nn.Linear, cols: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    weight = linear.weight.data[:, cols].clone()
    if scale is not None:
        weight = weight * scale.to(weight)
    linear.weight = nn.Parameter(weight)
    linear.in_features = len(cols)


def _head_hook(mask: torch.Tensor, num_heads: int):
    def hook(module, args):
        (x,) = args[:1]
        m = mask.to(x)  # a mask made on another device than its layer's follows it (a differentiable copy)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (num_heads, 1) if m.dim() == 2 else (num_heads, 1)
        out = (x.unflatten(-1, (num_heads, -1)) * m.reshape(shape)).flatten(-2)
        return (out,) + tuple(args[1:])
    return hook


def _filter_hook(mask: torch.Tensor):
    def hook(module, args):
        (x,) = args[:1]
        m = mask.to(x)
        if m.dim() == 2:
            m = m.reshape((x.shape[0],) + (1,) * (x.dim() - 2) + (m.shape[-1],))
        return (x * m,) + tuple(args[1:])
    return hook

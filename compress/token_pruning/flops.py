"""FLOPs of a token-pruned encoder, per example, from the number of tokens each layer ran on.

Cost model (the same terms as the head/filter pruner's, Kwon et al. 2022, evaluated at each layer's
own kept length n instead of one fixed length), in FLOPs = 2 x multiply-adds, for a layer with h heads
of size d, hidden size D and f FFN filters:
    attention  h * (4 n D d   [Q, K, V, O projections]  +  2 n^2 d   [scores and context]) * 2
    FFN        f * 2 n D * 2
Embeddings, LayerNorm, softmax and the task head are left out (they are small and pruning does not
change them). Ratios are taken against the *parent* architecture at the full input length, so for a
model that was also head/filter pruned the ratio shows both savings together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.token_pruning import parts as P


@dataclass(frozen=True)
class EncoderShape:
    hidden_size: int
    head_dim: int
    num_heads: tuple[int, ...]  # per layer
    num_filters: tuple[int, ...]  # per layer

    @property
    def num_layers(self) -> int:
        return len(self.num_heads)


def model_shape(model) -> EncoderShape:
    """The shape a (possibly slimmed) model really has, read from its weights."""
    config, layers = model.config, P.layer_parts(model)
    d = P.head_dim(config)
    heads = tuple(p.num_heads for p in layers)
    return EncoderShape(layers[0].o.out_features, d, heads, tuple(p.ffn_in.out_features for p in layers))


def parent_shape(config) -> EncoderShape:
    """The unpruned architecture the config describes (its uniform keys, ignoring per-layer ones)."""
    if config.model_type == "distilbert":
        hidden, heads, filters, layers = config.dim, config.n_heads, config.hidden_dim, config.n_layers
    else:
        hidden, heads = config.hidden_size, config.num_attention_heads
        filters, layers = config.intermediate_size, config.num_hidden_layers
    return EncoderShape(hidden, P.head_dim(config), (heads,) * layers, (filters,) * layers)


def layer_flops(n: torch.Tensor, num_heads: int, num_filters: int, hidden_size: int, head_dim: int) -> torch.Tensor:
    """FLOPs of one layer run on n tokens (n may be a tensor of per-example lengths)."""
    n = torch.as_tensor(n, dtype=torch.float64)
    attention = num_heads * (4 * n * hidden_size * head_dim + 2 * n * n * head_dim)
    ffn = num_filters * 2 * n * hidden_size
    return 2 * (attention + ffn)


def example_flops(num_tokens: torch.Tensor, shape: EncoderShape) -> torch.Tensor:
    """num_tokens: [B, L] tokens each layer ran on -> FLOPs per example [B] (float64)."""
    if num_tokens.shape[-1] != shape.num_layers:
        raise ValueError(f"num_tokens has {num_tokens.shape[-1]} layers, the shape {shape.num_layers}")
    per_layer = [layer_flops(num_tokens[:, i], shape.num_heads[i], shape.num_filters[i], shape.hidden_size,
                             shape.head_dim) for i in range(shape.num_layers)]
    return torch.stack(per_layer, 1).sum(1)


def flops_ratio(num_tokens: torch.Tensor, shape: EncoderShape, parent: EncoderShape) -> torch.Tensor:
    """Per-example FLOPs over the parent's FLOPs on the full input (layer 0's length). [B]"""
    full = num_tokens[:, :1].expand(-1, parent.num_layers)
    return example_flops(num_tokens, shape) / example_flops(full, parent)

"""Reads a Gemma 2 / Gemma 3 Hugging Face config.json (plain dict) into the shapes the runtime needs.

Handles both config generations (transformers 4: `rope_theta`, `rope_local_base_freq`, `rope_scaling`,
`sliding_window_pattern`; transformers 5: `rope_parameters` per layer type, `layer_types`) and the
per-layer shape keys of slimmed checkpoints (`num_attention_heads_per_layer`,
`num_key_value_heads_per_layer`, `intermediate_size_per_layer`). Never assumes uniform layers.
"""

from __future__ import annotations

from dataclasses import dataclass

GEMMA2, GEMMA3 = "gemma2", "gemma3"


@dataclass
class GemmaSpec:
    family: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    head_dim: int
    num_attention_heads: list[int]          # per layer
    num_key_value_heads: list[int]          # per layer
    intermediate_size: list[int]            # per layer
    sliding_windows: list[int | None]       # per layer; None = full attention
    rope_theta: list[float]                 # per layer
    rope_linear_factor: list[float]         # per layer (1.0 = no scaling)
    rms_norm_eps: float
    query_pre_attn_scalar: float
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    attention_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: list[int]

    @property
    def qk_norm(self) -> bool:
        return self.family == GEMMA3


def _family(cfg: dict) -> str:
    model_type = cfg.get("model_type", "")
    if model_type == "gemma2":
        return GEMMA2
    if model_type in ("gemma3", "gemma3_text"):
        return GEMMA3
    raise ValueError(f"model_type {model_type!r} is not supported (serve runs Gemma 2 and Gemma 3 text models)")


def _per_layer(cfg: dict, key: str, num_layers: int) -> list[int]:
    values = cfg.get(f"{key}_per_layer")
    if values is None:
        return [int(cfg[key])] * num_layers
    if len(values) != num_layers:
        raise ValueError(f"{key}_per_layer has {len(values)} entries for {num_layers} layers")
    return [int(v) for v in values]


def _layer_types(cfg: dict, family: str, num_layers: int) -> list[str]:
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    pattern = 2 if family == GEMMA2 else int(cfg.get("sliding_window_pattern", 6))
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]


def _rope(cfg: dict, family: str, layer_type: str) -> tuple[float, float]:
    """(base, linear factor) of one layer type, from either config generation."""
    params = cfg.get("rope_parameters") or {}
    if layer_type in params:
        params = params[layer_type]
    elif "rope_theta" not in params:
        default = 10_000.0 if family == GEMMA2 or layer_type == "sliding_attention" else 1_000_000.0
        theta = cfg.get("rope_local_base_freq" if family == GEMMA3 and layer_type == "sliding_attention"
                        else "rope_theta", default)
        scaling = (cfg.get("rope_scaling") or {}) if layer_type == "full_attention" else {}
        params = {**scaling, "rope_theta": theta}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"rope_type {kind!r} is not supported")
    return float(params["rope_theta"]), float(params.get("factor", 1.0)) if kind == "linear" else 1.0


def _eos_ids(cfg: dict) -> list[int]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def spec_from_config(cfg: dict) -> GemmaSpec:
    """Parse config.json; raises ValueError (with the offending key) for anything the runtime cannot run."""
    if "text_config" in cfg:
        cfg = {**cfg["text_config"], "eos_token_id": cfg["text_config"].get("eos_token_id", cfg.get("eos_token_id"))}
    family = _family(cfg)
    try:
        num_layers = int(cfg["num_hidden_layers"])
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // int(cfg["num_attention_heads"]))
        types = _layer_types(cfg, family, num_layers)
        window = cfg.get("sliding_window")
        ropes = [_rope(cfg, family, t) for t in types]
        heads = _per_layer(cfg, "num_attention_heads", num_layers)
        kv_heads = _per_layer(cfg, "num_key_value_heads", num_layers)
        spec = GemmaSpec(
            family=family, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, num_hidden_layers=num_layers,
            head_dim=head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
            intermediate_size=_per_layer(cfg, "intermediate_size", num_layers),
            sliding_windows=[int(window) if t == "sliding_attention" and window else None for t in types],
            rope_theta=[r[0] for r in ropes], rope_linear_factor=[r[1] for r in ropes],
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", head_dim)),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            attention_bias=bool(cfg.get("attention_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            eos_token_ids=_eos_ids(cfg))
    except KeyError as err:
        raise ValueError(f"config.json lacks {err.args[0]!r}") from None
    _check_heads(spec)
    return spec


def _check_heads(spec: GemmaSpec) -> None:
    for i, (hq, hkv) in enumerate(zip(spec.num_attention_heads, spec.num_key_value_heads)):
        if (hq == 0) != (hkv == 0) or (hkv and hq % hkv):
            raise ValueError(f"layer {i}: {hq} query heads cannot share {hkv} KV heads")

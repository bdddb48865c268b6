"""Model directories for the serving benchmark: public Gemma shapes with seeded random bf16 weights.

Speed depends on shapes, not values, so evals/bench_serve.py writes checkpoints in the served-model
contract (config.json, model.safetensors, tokenizer files) for: Gemma-2-2B, Gemma-2-9B, Gemma-2-27B, Gemma-3-1B, Gemma-3-4B
(text tower) and gemma-3-270m, from their published configs; and a slimmed sibling of any of them,
made by keeping the first k query/KV heads and filters of every layer of the parent's weights and
writing the per-layer shape keys (the contract between compress and serve). The tokenizer is a
synthetic word-level one over the full vocabulary ("t123" per id): prompts are token ids, and the
engine only needs to turn output ids back into text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_COMMON = dict(head_dim=256, query_pre_attn_scalar=256, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1,
               bos_token_id=2, tie_word_embeddings=True, attention_bias=False)
_ROPE3 = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
          "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}


def _gemma3_types(num_layers: int) -> list[str]:
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers)]


SHAPES = {
    "gemma-2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                       num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, sliding_window=4096,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=8192,
                       layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(26)],
                       rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    "gemma-2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                       num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, sliding_window=4096,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=8192,
                       layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(42)],
                       rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    "gemma-2-27b": dict(model_type="gemma2", vocab_size=256000, hidden_size=4608, intermediate_size=36864,
                        num_hidden_layers=46, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                        query_pre_attn_scalar=144, sliding_window=4096, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, max_position_embeddings=8192,
                        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(46)],
                        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    "gemma-3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, sliding_window=512,
                       max_position_embeddings=32768, layer_types=_gemma3_types(26), rope_parameters=_ROPE3),
    "gemma-3-4b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                       num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, sliding_window=1024,
                       max_position_embeddings=131072, layer_types=_gemma3_types(34),
                       rope_parameters={**_ROPE3, "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                      "rope_theta": 1_000_000.0}}),
    "gemma-3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                         num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, sliding_window=512,
                         max_position_embeddings=32768, layer_types=_gemma3_types(18), rope_parameters=_ROPE3),
}


def hf_config(name: str) -> dict:
    """config.json of a shape, through transformers' own config class (so HF loads it as is), with the
    architecture and dtype named, as a peer (vLLM) needs them to load the same directory."""
    from transformers import Gemma2Config, Gemma3TextConfig
    fields = {**_COMMON, **SHAPES[name]}
    gemma2 = fields.pop("model_type") == "gemma2"
    cls = Gemma2Config if gemma2 else Gemma3TextConfig
    config = cls(**fields).to_dict()
    config.update(architectures=["Gemma2ForCausalLM" if gemma2 else "Gemma3ForCausalLM"], dtype="bfloat16")
    return config


def synthetic_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab.update({"<pad>": 0, "<eos>": 1, "<bos>": 2})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")      # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def random_weights(config: dict, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named bf16 tensors of the shapes serve's loader expects, drawn on `device`."""
    from serve.models.gemma import GemmaForCausalLM
    from serve.models.gemma_config import spec_from_config
    with torch.device("meta"):
        model = GemmaForCausalLM(spec_from_config(config))
    gen = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, param in model.state_dict().items():
        std = 0.1 if "norm" in name else 0.02
        tensors[name] = (torch.randn(param.shape, generator=gen, device=device) * std).to(torch.bfloat16)
    return tensors


def write_checkpoint(path: Path, config: dict, tensors: dict, tokenizer) -> Path:
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path / "model.safetensors"))
    tokenizer.save_pretrained(path)
    return path


def slim(config: dict, tensors: dict, keep_heads: int, keep_kv_heads: int, keep_filters: int) -> tuple[dict, dict]:
    """Keep the first heads/filters of every layer: per-layer shape keys and sliced parent weights."""
    num_layers, d = config["num_hidden_layers"], config["head_dim"]
    out = dict(tensors)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = tensors[p + "self_attn.q_proj.weight"][:keep_heads * d]
        out[p + "self_attn.o_proj.weight"] = tensors[p + "self_attn.o_proj.weight"][:, :keep_heads * d]
        for proj in ("k_proj", "v_proj"):
            out[p + f"self_attn.{proj}.weight"] = tensors[p + f"self_attn.{proj}.weight"][:keep_kv_heads * d]
        for proj in ("gate_proj", "up_proj"):
            out[p + f"mlp.{proj}.weight"] = tensors[p + f"mlp.{proj}.weight"][:keep_filters]
        out[p + "mlp.down_proj.weight"] = tensors[p + "mlp.down_proj.weight"][:, :keep_filters]
    slimmed = {**config, "num_attention_heads_per_layer": [keep_heads] * num_layers,
               "num_key_value_heads_per_layer": [keep_kv_heads] * num_layers,
               "intermediate_size_per_layer": [keep_filters] * num_layers}
    return slimmed, out


def layer_flops_per_token(config: dict, heads: int, kv_heads: int, filters: int) -> int:
    """Multiply-adds x2 of one layer's projections and MLP per token (attention scores excluded)."""
    h, d = config["hidden_size"], config["head_dim"]
    return 2 * (2 * h * heads * d + 2 * h * kv_heads * d + 3 * h * filters)


def slim_for_flops(config: dict, target: float) -> tuple[int, int, int]:
    """Halve the heads (keeping the GQA ratio) and pick the filters that bring a layer to `target` FLOPs."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    keep_kv = max(1, kv // 2)
    keep_heads = heads * keep_kv // kv
    full = layer_flops_per_token(config, heads, kv, config["intermediate_size"])
    attn = layer_flops_per_token(config, keep_heads, keep_kv, 0)
    filters = int((target * full - attn) / (2 * 3 * config["hidden_size"]))
    return keep_heads, keep_kv, max(64, filters // 64 * 64)


def build(name: str, root: Path, device: str, slim_flops: float | None = None) -> tuple[Path, dict]:
    """Write (once) the model directory of a shape, or of its slimmed sibling; returns (path, config)."""
    config = hf_config(name)
    path = root / (name if slim_flops is None else f"{name}-slim{slim_flops}")
    if (path / "model.safetensors").is_file():
        return path, json.loads((path / "config.json").read_text())
    tensors = random_weights(config, device)
    if slim_flops is not None:
        config, tensors = slim(config, tensors, *slim_for_flops(config, slim_flops))
    write_checkpoint(path, config, tensors, synthetic_tokenizer(config["vocab_size"]))
    del tensors
    return path, config

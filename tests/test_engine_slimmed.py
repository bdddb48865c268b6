"""A slimmed Gemma 3 with uneven layers (per-layer head / KV-head / filter counts, a layer with no
attention at all, a layer with no filters) served by the engine equals the masked dense HF model.

The slimmed checkpoint is made here by slicing a tiny dense model and writing the per-layer shape
keys of the checkpoint contract (README); the reference zeroes the same heads and filters in the dense model.
"""


import torch
from safetensors.torch import save_file

from serve import LLM, SamplingParams
from serve.kv_cache import group_layers
from serve_fixtures import gemma3_config, hf_greedy, random_model, random_prompts, save_model

HEAD_DIM = 16
# layer -> (kept query heads, kept KV heads, kept filters); 4 query heads share 2 KV heads (pairs).
KEEP = {0: ([0, 1], [0], list(range(96))), 1: ([], [], []), 2: ([0, 1, 2, 3], [0, 1], list(range(0, 96, 3))),
        3: ([2, 3], [1], list(range(50)))}


def _rows(heads):
    return [h * HEAD_DIM + d for h in heads for d in range(HEAD_DIM)]


def mask_dense(model):
    """Zero the pruned heads (o_proj columns) and filters (down_proj columns) in place."""
    with torch.no_grad():
        for i, (heads, _, filters) in KEEP.items():
            layer = model.model.layers[i]
            dropped = [c for c in range(4 * HEAD_DIM) if c not in _rows(heads)]
            layer.self_attn.o_proj.weight[:, dropped] = 0
            layer.mlp.down_proj.weight[:, [f for f in range(96) if f not in filters]] = 0


def slim_state_dict(model) -> dict:
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i, (heads, kv_heads, filters) in KEEP.items():
        p = f"model.layers.{i}."
        for name, keep in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
            sd[p + f"self_attn.{name}.weight"] = sd[p + f"self_attn.{name}.weight"][_rows(keep)].contiguous()
        sd[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][:, _rows(heads)].contiguous()
        for name in ("gate_proj", "up_proj"):
            sd[p + f"mlp.{name}.weight"] = sd[p + f"mlp.{name}.weight"][filters].contiguous()
        sd[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][:, filters].contiguous()
    return sd


def test_uneven_slimmed_model_matches_masked_dense(tmp_path):
    model = random_model(gemma3_config(), seed=11)
    path = save_model(model, tmp_path / "slim", extra_config={
        "num_attention_heads_per_layer": [len(KEEP[i][0]) for i in range(4)],
        "num_key_value_heads_per_layer": [len(KEEP[i][1]) for i in range(4)],
        "intermediate_size_per_layer": [len(KEEP[i][2]) for i in range(4)]})
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_file(slim_state_dict(model), str(path / "model.safetensors"), metadata={"format": "pt"})
    mask_dense(model)
    prompts = random_prompts([5, 19, 27], seed=4)
    expected = [hf_greedy(model, p, 8) for p in prompts]
    llm = LLM(path, block_size=4, max_num_batched_tokens=12)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outputs] == expected
    runner = llm.engine.runner
    assert runner.kv_caches[1] is None                              # no KV heads: no cache at all
    assert runner.kv_caches[0][0].shape[2] == 1 and runner.kv_caches[2][0].shape[2] == 2
    assert group_layers(runner.spec) == {8: [0, 3], None: [2]}           # layers 0, 3 sliding; 2 global

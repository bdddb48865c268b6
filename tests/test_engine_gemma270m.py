"""The offline gemma-3-270m (converted by `compress.models.hub` into the cache) through the engine equals
Hugging Face greedy `generate`. Skipped when the converted model is not in the cache."""

import pytest
import torch

from serve import LLM, SamplingParams


def model_dir():
    from compress.models.hub import offline_cache_path
    path = offline_cache_path("gemma-3-270m")
    return path if (path / "config.json").is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(model_dir() is None, reason="gemma-3-270m not converted (run `compress fetch gemma-3-270m`)")
def test_gemma_3_270m_greedy_matches_hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = model_dir()
    prompt = "The capital of France is"
    out = LLM(path, max_model_len=256, max_num_seqs=2).generate(prompt, SamplingParams(temperature=0, max_tokens=8))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out[0].outputs[0].token_ids == expected

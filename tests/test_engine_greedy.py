"""Greedy engine output equals Hugging Face `generate` on tiny random Gemma 2 and Gemma 3 models.

Covers mixed prompt lengths (several longer than the sliding window), prefills split across steps by
the token budget, preemption by recomputation under a tiny KV pool, prefix-cache hits, n > 1 with
copy-on-write, and block accounting (all blocks free at the end; sliding layers keep only their window).
"""

import math

import pytest

from serve import LLM, SamplingParams
from serve.block_manager import FREED
from serve_fixtures import WINDOW, gemma2_config, gemma3_config, hf_greedy, random_model, random_prompts, save_model

NEW_TOKENS = 8
LENGTHS = [3, 30, 12, 21, 9]       # WINDOW is 8: most prompts are longer than the window
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def tiny(request, tmp_path_factory):
    config = gemma2_config() if request.param == "gemma2" else gemma3_config()
    model = random_model(config, seed=3)
    path = save_model(model, tmp_path_factory.mktemp(request.param))
    prompts = random_prompts(LENGTHS)
    return path, model, prompts, [hf_greedy(model, p, NEW_TOKENS) for p in prompts]


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_mixed_batch_with_chunked_prefill_matches_hf(tiny):
    path, _, prompts, expected = tiny
    llm = LLM(path, block_size=4, max_num_batched_tokens=16, max_num_seqs=8)
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    assert llm.engine.block_manager.num_used_blocks() == 0


def test_preemption_recomputes_and_matches_hf(tiny):
    path, _, prompts, expected = tiny
    llm = LLM(path, block_size=4, max_num_batched_tokens=16, num_kv_blocks=12, max_model_len=48)
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_used_blocks() == 0


def test_prefix_cache_hits_match_hf(tiny):
    path, model, prompts, expected = tiny
    llm = LLM(path, block_size=4, max_num_batched_tokens=64)
    llm.generate(prompts[1], GREEDY)
    shared = prompts[1][:26] + [7, 8, 9]
    before = llm.engine.scheduler.num_cached_tokens
    outputs = llm.generate([prompts[1], shared], GREEDY)
    assert llm.engine.scheduler.num_cached_tokens - before >= 24 + 24
    assert token_ids(outputs) == [expected[1], hf_greedy(model, shared, NEW_TOKENS)]


def test_n_samples_share_prompt_blocks_copy_on_write(tiny):
    path, _, prompts, expected = tiny
    llm = LLM(path, block_size=4)
    params = SamplingParams(n=3, temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    (output,) = llm.generate(prompts[3], params)     # 21 tokens: the last prompt block is shared, partly full
    assert [o.token_ids for o in output.outputs] == [expected[3]] * 3
    assert llm.engine.block_manager.num_copies > 0
    assert llm.engine.block_manager.num_used_blocks() == 0


def test_sliding_layers_hold_only_their_window_and_abort_frees(tiny):
    path, _, prompts, _ = tiny
    llm = LLM(path, block_size=4, max_num_batched_tokens=8)
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), f"r{i}")
    limit = math.ceil((WINDOW - 1) / 4) + 1
    for step in range(25):
        engine.step()
        if step == 10:
            engine.abort_request("r1")
        for seq in engine.scheduler.running:
            held = [b for b in seq.block_tables[WINDOW] if b != FREED]
            assert len(held) <= limit, (step, seq.block_tables[WINDOW])
    engine.abort_request("r2")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_used_blocks() == 0

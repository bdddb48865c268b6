"""Logits processors (penalties, logit_bias, min_tokens) against plain-torch references and HF, and the
engine's per-request failure isolation, on tiny seeded Gemma models (CPU)."""

import pytest
import torch

from serve import LLM, SamplingParams
from serve.logits_processors import process
from serve.sequence import Sequence
from serve_fixtures import gemma2_config, random_model, random_prompts, save_model

VOCAB = 50


def seq_with(params, prompt, output):
    seq = Sequence("r", prompt, params)
    seq.token_ids += output
    seq.stop_token_set = {1, 7}
    return seq


def reference(logits, seq):
    """The definitions of serve/logits_processors.py, one row at a time, in plain Python loops."""
    p, row = seq.params, logits.clone()
    if seq.num_output_tokens < p.min_tokens:
        for t in seq.stop_token_set:
            row[t] = float("-inf")
    for t, bias in (p.logit_bias or {}).items():
        row[t] += bias
    for t in set(seq.token_ids):
        row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(seq.output_token_ids):
        count = seq.output_token_ids.count(t)
        row[t] -= p.presence_penalty + p.frequency_penalty * count
    return row


def test_processors_match_the_reference_row_by_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, VOCAB, generator=g) * 3
    params = [SamplingParams(repetition_penalty=1.7, max_tokens=20),
              SamplingParams(presence_penalty=0.8, frequency_penalty=-0.6, max_tokens=20),
              SamplingParams(logit_bias={3: 5.5, 40: -100.0}, min_tokens=9, max_tokens=20),
              SamplingParams(max_tokens=20),                                   # asks for nothing
              SamplingParams(repetition_penalty=0.5, presence_penalty=-1.5, frequency_penalty=2.0,
                             logit_bias={7: 2.0}, min_tokens=3, max_tokens=20)]
    seqs = [seq_with(p, torch.randint(2, VOCAB, (6,), generator=g).tolist(),
                     torch.randint(2, VOCAB, (i + 2,), generator=g).tolist()) for i, p in enumerate(params)]
    before = logits.clone()
    out = process(logits, seqs)
    assert torch.equal(logits, before)                   # the caller's logits are not touched
    expected = torch.stack([reference(before[i], seq) for i, seq in enumerate(seqs)])
    assert torch.allclose(out, expected, atol=1e-6)


def test_a_batch_asking_for_nothing_is_not_copied():
    logits = torch.randn(3, VOCAB)
    seqs = [seq_with(SamplingParams(temperature=0.5, top_k=3), [2, 3], [4]) for _ in range(3)]
    assert process(logits, seqs) is logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = random_model(gemma2_config(num_layers=2), seed=2)
    return model, save_model(model, tmp_path_factory.mktemp("proc"))


def test_repetition_penalty_greedy_equals_hf_generate(tiny):
    model, path = tiny
    prompts = random_prompts([7, 12], seed=4)
    llm = LLM(path, block_size=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.8)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    with torch.no_grad():
        expected = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, repetition_penalty=1.8,
                                   eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12,
                                                                                      ignore_eos=True))]
    assert got == expected and got != plain                 # the penalty changed the output, as HF's does


def test_penalties_take_the_synchronous_path_on_the_fast_path(tiny):
    """The fast path's decode graphs compute the argmax of unprocessed logits and its overlapped loop
    samples before the host sees the last token: requests with processors must use neither."""
    _, path = tiny
    prompts = random_prompts([5, 9, 14], seed=6)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.5,
                            frequency_penalty=0.7, logit_bias={11: 1.5})
    slow = LLM(path, block_size=4, fast_path="off").generate(prompts, params)
    fast = LLM(path, block_size=4, fast_path="on").generate(prompts, params)
    assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in slow]


def test_logit_bias_and_min_tokens_shape_the_output(tiny):
    _, path = tiny
    llm = LLM(path, block_size=4)
    prompt = random_prompts([6], seed=8)[0]
    forced = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                 logit_bias={42: 100.0}))[0].outputs[0]
    assert forced.token_ids == [42] * 5
    eos_first = SamplingParams(temperature=0, max_tokens=20, logit_bias={1: 100.0}, min_tokens=4)
    out = llm.generate(prompt, eos_first)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == 1 and 1 not in out.token_ids[:4]
    assert out.finish_reason == "stop"


def test_extreme_but_valid_seed_and_top_k_sample(tiny):
    _, path = tiny
    llm = LLM(path, block_size=4)
    params = SamplingParams(temperature=1.0, n=2, seed=2**64 - 1, top_k=2**31 - 1, max_tokens=4, ignore_eos=True)
    first, second = (llm.generate("hello", params)[0] for _ in range(2))
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
    assert first.error is None and len(first.outputs) == 2


def test_one_failing_request_fails_alone(tiny, monkeypatch):
    import serve.engine
    _, path = tiny
    llm = LLM(path, block_size=4, max_num_seqs=8)
    prompts = random_prompts([5, 8, 11], seed=3)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    real = serve.engine.sample

    def sample(logits, seqs, argmax=None):
        if any(seq.params.seed == 666 for seq in seqs):
            raise RuntimeError("injected")
        return real(logits, seqs, argmax)
    monkeypatch.setattr(serve.engine, "sample", sample)
    doomed = SamplingParams(temperature=1.0, seed=666, n=2, max_tokens=6, ignore_eos=True)
    engine = llm.engine
    ids = [engine.add_request(p, greedy) for p in prompts] + [engine.add_request(prompts[0], doomed)]
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert [done[i].outputs[0].token_ids for i in ids[:3]] == expected
    assert done[ids[3]].error and done[ids[3]].outputs[0].finish_reason == "error"
    assert engine.block_manager.num_used_blocks() == 0 and engine.metrics.failed == 1

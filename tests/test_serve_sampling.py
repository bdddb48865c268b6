"""Sampler, detokenizer and stop handling: top-k/top-p limits, per-request seeds, logprobs of the
soft-capped distribution (checked against HF), UTF-8-safe incremental text, stop strings."""

import pytest
import torch

from serve import LLM, SamplingParams
from serve.detokenizer import IncrementalDetokenizer
from serve.sampler import sample
from serve.sequence import Sequence
from serve_fixtures import build_tokenizer, gemma2_config, random_model, random_prompts, save_model


def seqs_for(params_list, seeds=None):
    out = []
    for i, params in enumerate(params_list):
        s = Sequence(str(i), [1], params)
        s.generator = None if seeds is None or seeds[i] is None else torch.Generator().manual_seed(seeds[i])
        out.append(s)
    return out


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 3 + [SamplingParams(temperature=1.5, top_p=1e-6)] * 3
    tokens, _ = sample(logits, seqs_for(params))
    assert tokens == logits.argmax(dim=1).tolist()


def test_seed_reproducible_and_top_k_respected():
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=1.0, top_k=5)] * 4
    draws = [sample(logits, seqs_for(params, seeds=[1, 2, 3, 4]))[0] for _ in range(2)]
    assert draws[0] == draws[1]
    top5 = logits.topk(5, dim=1).indices
    for _ in range(20):
        tokens, _ = sample(logits, seqs_for(params))
        assert all(t in top5[i].tolist() for i, t in enumerate(tokens))


def test_temperature_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    tokens, _ = sample(logits, seqs_for([SamplingParams(temperature=1.0)] * 4000))
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    assert torch.allclose(freq, logits[0].softmax(0), atol=0.03)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    model = random_model(gemma2_config(num_layers=2), seed=2)
    return model, LLM(save_model(model, tmp_path_factory.mktemp("g2")), block_size=4)


def test_logprobs_match_hf_softcapped_logits(gemma2):
    model, llm = gemma2
    prompt = random_prompts([10])[0]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, logprobs=3))[0].outputs[0]
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)
    entry = out.logprobs[0]
    assert entry["token"] == int(ref.argmax())
    assert abs(entry["logprob"] - float(ref.max())) < 1e-4
    assert [t for t, _ in entry["top"]] == ref.topk(3).indices.tolist()


def test_stop_string_cuts_text(gemma2):
    _, llm = gemma2
    prompt = random_prompts([6], seed=9)[0]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    text = free.text
    assert len(text) >= 4
    stop = text[2:4]
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True))[0]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].text == text[:text.index(stop)]


def test_incremental_detokenizer_never_splits_characters():
    tokenizer = build_tokenizer()
    text = "caf\u00e9 \u65e5\u672c\u8a9e \U0001f600 na\u00efve \u00fcber"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, [2])
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert any(d == "" for d in deltas)            # some token ended mid-character and was held back

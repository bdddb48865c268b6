"""Speculative decoding in the engine on tiny Gemma 2 and Gemma 3 targets: greedy tokens with a draft
(fixed K and auto) equal greedy tokens without, through mixed batches, chunked prefill, preemption,
prefix-cache hits, stop strings, stop tokens and max_tokens reached mid-draft; every block of both models
is free after all requests end or abort, and sliding-window groups of both models hold only their window;
a draft that cannot draft for the target is refused. The draft is lazy: steps that draft nothing do not
run it, and a step that drafts after a stretch of k = 0 first catches it up (lengths forced here).

Drafts: a slimmed child of the target (its first two layers, one of them with half its heads and
filters), the target itself (every drafted token accepted) and an unrelated random model (almost none).
"""

import itertools
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from serve_fixtures import (
    WINDOW,
    build_tokenizer,
    gemma2_config,
    gemma3_config,
    random_model,
    random_prompts,
    save_model,
)

from serve import LLM, LLMEngine, SamplingParams
from serve.block_manager import FREED
from serve.config import MAX_SPECULATIVE_TOKENS, EngineConfig
from serve.speculative.goodput import BatchTimeModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evals.loopback import call, metric, stream

NEW_TOKENS = 10
LENGTHS = [3, 30, 12, 21, 9]
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
SMALL = {"block_size": 4, "max_num_batched_tokens": 16, "max_num_seqs": 8, "kv_cache_bytes": 2**22}


def slim_child(target, path, family: str):
    """The target's first two layers; layer 1 keeps query heads 0-1, KV head 0 and half the filters."""
    config = gemma2_config(2) if family == "gemma2" else gemma3_config(2)
    child = random_model(config, seed=0)
    state = {k: v for k, v in target.state_dict().items() if not k.startswith("model.layers.")
             or int(k.split(".")[2]) < 2}
    child.load_state_dict(state)
    path = save_model(child, path, extra_config={"num_attention_heads_per_layer": [4, 2],
                                                 "num_key_value_heads_per_layer": [2, 1],
                                                 "intermediate_size_per_layer": [96, 48]})
    sd = {k: v.clone().contiguous() for k, v in child.state_dict().items() if k != "lm_head.weight"}
    p = "model.layers.1."
    for name, rows in (("q_proj", 32), ("k_proj", 16), ("v_proj", 16)):
        sd[p + f"self_attn.{name}.weight"] = sd[p + f"self_attn.{name}.weight"][:rows].contiguous()
    sd[p + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][:, :32].contiguous()
    for name in ("gate_proj", "up_proj"):
        sd[p + f"mlp.{name}.weight"] = sd[p + f"mlp.{name}.weight"][:48].contiguous()
    sd[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][:, :48].contiguous()
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def tiny(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = random_model(gemma2_config() if family == "gemma2" else gemma3_config(), seed=3)
    target = save_model(model, root / "target")
    drafts = {"slim": slim_child(model, root / "slim", family), "self": target,
              "random": save_model(random_model(gemma2_config(2), seed=9), root / "random")}
    prompts = random_prompts(LENGTHS)
    plain = LLM(target, **SMALL)
    expected = token_ids(plain.generate(prompts, GREEDY))
    return target, drafts, prompts, expected, plain


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def speculative(tiny, draft="slim", k="auto", **config):
    target, drafts, *_ = tiny
    llm = LLM(target, draft=drafts[draft], num_speculative_tokens=k, **{**SMALL, **config})
    if k == "auto":
        pin_launch_bound(llm.engine.speculator)
    return llm


def pin_launch_bound(speculator, draft_seconds=0.001, target_seconds=0.010):
    """Timings of tiny models on a shared CPU are noise: give `auto` a fixed launch-bound profile (a cheap
    draft, a flat target) where drafting pays, and make it ignore what it observes."""
    def flat(seconds):
        return BatchTimeModel({1 << i: seconds for i in range(10)}, weight=0.0)
    speculator.draft_time, speculator.target_time = flat(draft_seconds), flat(target_seconds)
    speculator.draft_graph_time, speculator.verify_time = flat(draft_seconds), flat(target_seconds)
    speculator.decode_time = flat(target_seconds)


def assert_all_free(llm):
    assert llm.engine.block_manager.num_used_blocks() == 0


def run_requests(engine, prompts, params) -> list:
    """One request per (prompt, params), stepped until all finish: their final outputs, in request order."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[i] for i in ids]


def mixed_requests_under_preemption(llm, prompts, expected, new_tokens: int) -> list:
    """Greedy, sampled n=2 and logprobs rows (which do not speculate) in one batch of `llm`, whose KV pool is
    small enough to preempt: greedy rows keep their tokens, sampled rows run to the end, every block comes
    back. Returns the outputs in request order."""
    greedy = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, top_p=0.8, n=2, max_tokens=new_tokens, ignore_eos=True, seed=3)
    logprobs = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=2)
    outputs = run_requests(llm.engine, prompts, [greedy, sampled, logprobs, greedy, sampled])
    for i in (0, 2, 3):
        assert outputs[i].outputs[0].token_ids == expected[i]
    assert [len(o.token_ids) for o in outputs[1].outputs] == [new_tokens] * 2
    assert llm.engine.scheduler.num_preemptions > 0
    assert_all_free(llm)
    return outputs


@pytest.mark.parametrize("k", [1, 3, "auto"])
def test_greedy_with_a_slimmed_draft_equals_plain_greedy(tiny, k):
    _, _, prompts, expected, _ = tiny
    llm = speculative(tiny, k=k)
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    stats = llm.engine.speculator.stats
    assert stats.num_drafted > 0 and stats.num_verified > 0
    assert_all_free(llm)


@pytest.mark.parametrize("draft", ["self", "random"])
def test_perfect_and_useless_drafts(tiny, draft):
    _, _, prompts, expected, _ = tiny
    llm = speculative(tiny, draft, k=2)
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    rate = llm.engine.speculator.stats.acceptance_rate
    assert rate == 1.0 if draft == "self" else rate < 0.3
    assert "accepted" in llm.summary()
    assert_all_free(llm)


def test_preemption_with_drafts(tiny):
    _, _, prompts, expected, _ = tiny
    llm = speculative(tiny, "self", k=3, num_kv_blocks=14, max_model_len=48, kv_cache_bytes=None)
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert_all_free(llm)


def prefix_cache_hits(tiny, llm, greedy):
    """A prompt again and one sharing its first 26 tokens: both hit the prefix cache (24 tokens each, whole
    blocks) and give the target's own greedy tokens; every block comes back."""
    _, _, prompts, expected, plain = tiny
    llm.generate(prompts[1], greedy)
    shared = prompts[1][:26] + [7, 8, 9]
    before = llm.engine.scheduler.num_cached_tokens
    outputs = llm.generate([prompts[1], shared], greedy)
    assert llm.engine.scheduler.num_cached_tokens - before >= 24 + 24
    assert token_ids(outputs) == [expected[1], token_ids(plain.generate(shared, greedy))[0]]
    assert_all_free(llm)


def test_prefix_cache_hits_with_drafts(tiny):
    prefix_cache_hits(tiny, speculative(tiny, k=2), GREEDY)


def test_stops_inside_a_draft(tiny):
    """With the target as its own draft every step appends K + 1 tokens: stops land mid-draft."""
    _, _, prompts, expected, plain = tiny
    llm = speculative(tiny, "self", k=3)
    short = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert token_ids(llm.generate(prompts, short)) == [e[:6] for e in expected]
    stop_token = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, stop_token_ids=[expected[0][2]])
    assert token_ids(llm.generate(prompts[0], stop_token)) == token_ids(plain.generate(prompts[0], stop_token))
    text = plain.generate(prompts[3], GREEDY)[0].outputs[0].text
    stop = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, stop=[text[len(text) // 2:][:2]])
    want, got = plain.generate(prompts[3], stop)[0].outputs[0], llm.generate(prompts[3], stop)[0].outputs[0]
    assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
    assert_all_free(llm)


def test_abort_and_sampling_free_every_block_and_windows_hold(tiny):
    _, _, prompts, _, _ = tiny
    llm = speculative(tiny, k="auto")
    engine = llm.engine
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=12, ignore_eos=True, seed=5)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, f"r{i}")
    limit = -(-(WINDOW + MAX_SPECULATIVE_TOKENS) // 4) + 1       # the window plus a draft, in blocks of 4
    for step in range(12):
        engine.step()
        if step == 6:
            engine.abort_request("r1")
        for seq in engine.scheduler.running:
            for key in (WINDOW, ("draft", WINDOW)):
                assert len([b for b in seq.block_tables[key] if b != FREED]) <= limit, (key, seq.block_tables[key])
    engine.abort_request("r2")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.speculator.stats.num_drafted > 0
    assert_all_free(llm)


def test_metrics_page_shows_speculation(tiny):
    from serve.metrics import render
    _, _, prompts, _, _ = tiny
    llm = speculative(tiny, "self", k=2)
    llm.generate(prompts[:2], GREEDY)
    page = render(llm.engine)
    assert "serve_spec_acceptance_rate 1.000000" in page
    assert 'serve_spec_steps_by_length_total{length="2"}' in page
    mean = float(page.split("\nserve_spec_mean_accepted_length ")[1].split()[0])
    assert 2.0 < mean <= 3.0          # at most K + 1; less where max_tokens cut a draft short


def other_vocabulary(tmp_path):
    config = gemma2_config(2)
    config.vocab_size = 300
    return save_model(random_model(config, seed=1), tmp_path / "vocab300")


def other_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    tok = build_tokenizer()
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.add_tokens(["<extra>"])
    vocab = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    return save_model(random_model(gemma2_config(2), seed=1), tmp_path / "othertok", tokenizer=vocab)


@pytest.mark.parametrize("case", ["vocab", "tokenizer", "k_high", "k_low", "unservable", "no_room"])
def test_bad_drafts_are_refused(tiny, tmp_path, case):
    target, drafts, *_ = tiny
    draft, k, extra, message = drafts["slim"], 2, {}, ""
    if case == "vocab":
        draft, message = other_vocabulary(tmp_path), "vocabulary"
    elif case == "tokenizer":
        draft, message = other_tokenizer(tmp_path), "tokenizer"
    elif case in ("k_high", "k_low"):
        k, message = 9 if case == "k_high" else -1, "num_speculative_tokens"
    elif case == "unservable":
        (tmp_path / "empty").mkdir()
        draft, message = tmp_path / "empty", "cannot be served"
    else:
        extra, message = {"kv_cache_bytes": 2**17}, "does not fit"     # enough for the target alone
    with pytest.raises(ValueError, match=message):
        LLM(target, draft=str(draft), num_speculative_tokens=k, **{**SMALL, **extra})


def test_cli_refuses_a_bad_draft_with_exit_2(tiny, tmp_path, capsys):
    from compress.cli import main
    target, *_ = tiny
    draft = other_vocabulary(tmp_path)
    capsys.readouterr()
    assert main(["serve", str(target), "--draft", str(draft), "--device", "cpu"]) == 2
    assert main(["serve", str(target), "--draft", str(target), "--num-speculative-tokens", "many"]) == 2
    assert main(["serve", str(target), "--num-speculative-tokens", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("compress serve: error:") for line in err)


def test_seeded_sampling_is_reproducible_with_a_draft(tiny):
    _, _, prompts, _, _ = tiny
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=11)
    first = token_ids(speculative(tiny, k=2).generate(prompts[:2], params))
    assert first == token_ids(speculative(tiny, k=2).generate(prompts[:2], params))
    assert torch.tensor(first).max() < 320


def test_steps_that_draft_nothing_do_not_run_the_draft(tiny):
    _, _, prompts, _, _ = tiny
    llm = speculative(tiny, k="auto")
    speculator = llm.engine.speculator
    speculator._choose = lambda batch, seqs, caps: 0
    calls = []
    run_spans = speculator.draft.run_spans
    speculator.draft.run_spans = lambda spans: calls.append(len(spans)) or run_spans(spans)
    llm.generate(prompts, GREEDY)
    assert calls == []


ALTERNATION = (0, 3, 0, 0, 2, 0, 1, 0, 0, 0, 4)


@pytest.mark.parametrize("draft", ["slim", "self"])
def test_greedy_with_lengths_alternating_zero_and_more(tiny, draft):
    """auto's choice forced to alternate k = 0 (the draft idles and lags) with k > 0 (it catches up
    first), through chunked prefill and preemption: greedy tokens equal plain greedy, the target as its
    own draft keeps every token (the caught-up KV is right), and every block comes back."""
    _, _, prompts, expected, _ = tiny
    llm = speculative(tiny, draft, num_kv_blocks=14, max_model_len=48, kv_cache_bytes=None)
    lengths = itertools.cycle(ALTERNATION)
    llm.engine.speculator._choose = lambda batch, seqs, caps: next(lengths)
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    stats = llm.engine.speculator.stats
    assert stats.chosen.get(0, 0) > 0 and stats.num_drafted > 0
    assert llm.engine.scheduler.num_preemptions > 0
    assert stats.acceptance_rate == 1.0 if draft == "self" else stats.acceptance_rate > 0
    assert_all_free(llm)


def record_catch_ups(speculator) -> list:
    """Per draft step, (draft's count before, span start, span length, drafts?, target's count, tokens)
    of each catch-up span, and the draft's count after the step's passes."""
    steps, draft = [], speculator._draft

    def record(spans, lengths, drafts):
        if spans:
            before = [(s.seq.num_draft_computed, s.start, len(s.ids), s.num_logits, s.seq.num_computed_tokens,
                       s.seq.num_tokens) for s in spans]
            draft(spans, lengths, drafts)
            steps.append((before, [s.seq.num_draft_computed for s in spans]))
        else:
            draft(spans, lengths, drafts)
    speculator._draft = record
    return steps


def test_a_long_stretch_of_k_zero_then_catch_up_before_proposing(tiny):
    """After steps that draft nothing, the first drafting step computes every token the draft skipped
    (chunked within the step's token budget) before it proposes; blocks of both models all come back
    after requests finish or abort, lagging or not."""
    _, _, prompts, expected, _ = tiny
    llm = speculative(tiny, "self")
    engine, speculator = llm.engine, llm.engine.speculator
    choices = itertools.chain([0] * 8, itertools.repeat(3))
    speculator._choose = lambda batch, seqs, caps: next(choices)
    steps = record_catch_ups(speculator)
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    assert speculator.stats.acceptance_rate == 1.0
    first, _ = steps[0]
    assert max(length for _, _, length, *_ in first) > 1          # the lag of the stretch, in one query
    for before, after in steps:
        assert sum(length for _, _, length, *_ in before) <= SMALL["max_num_batched_tokens"]
        for (draft_count, start, length, proposes, target_count, num_tokens), count in zip(before, after):
            assert start == draft_count and count == start + length
            if proposes:       # caught up: the draft has every token the target has after this step
                assert count == num_tokens == target_count + 1
    assert_all_free(llm)
    choices = itertools.chain([0] * 4, itertools.repeat(2))
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    for step in range(40):
        engine.step()
        if step == 3:
            assert any(s.num_draft_computed < s.num_computed_tokens for s in engine.scheduler.running)
            engine.abort_request(ids[1])
        if step == 9:
            engine.abort_request(ids[3])
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_free(llm)


def test_mixed_requests_under_preemption(tiny):
    """Greedy, sampled n=2 (forked after the prompt) and logprobs rows (which do not speculate) in one
    batch under a KV pool small enough to preempt: greedy rows keep their tokens, every block comes back."""
    _, _, prompts, expected, _ = tiny
    llm = speculative(tiny, "self", k=4, num_kv_blocks=20, max_model_len=48, kv_cache_bytes=None, max_num_seqs=4)
    outputs = mixed_requests_under_preemption(llm, prompts, expected, NEW_TOKENS)
    assert len(outputs[2].outputs[0].logprobs) == NEW_TOKENS


def test_server_streams_speculative_greedy_text_and_metrics(tiny):
    from server_harness import LiveServer
    target, drafts, prompts, _, plain = tiny
    expected = [o.outputs[0].text for o in plain.generate(prompts[:2], GREEDY)]
    engine = LLMEngine(EngineConfig(model=str(target), draft=str(drafts["self"]), num_speculative_tokens=3, **SMALL))
    with LiveServer(engine, "tiny") as live:
        reply = stream(live.port, "/v1/completions", {"model": "tiny", "prompt": prompts[:2], "temperature": 0,
                                                      "max_tokens": NEW_TOKENS, "ignore_eos": True})
        assert reply.done and reply.texts() == dict(enumerate(expected))
        assert metric(live.port, "serve_spec_acceptance_rate") == 1.0
        assert metric(live.port, "serve_kv_blocks_used") == 0
        for bad in (-1, MAX_SPECULATIVE_TOKENS + 1, 1.5, "auto"):
            body = {"model": "tiny", "prompt": "hello", "max_tokens": 2, "max_speculative_tokens": bad}
            reply = call(live.port, "POST", "/v1/completions", body)
            assert reply.status == 400 and b"max_speculative_tokens" in reply.body, (bad, reply.body)


def test_request_cap_on_speculative_tokens(tiny):
    _, _, prompts, expected, _ = tiny
    llm = speculative(tiny, "self", k=3)
    stats = llm.engine.speculator.stats
    none = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, max_speculative_tokens=0)
    assert token_ids(llm.generate(prompts[:2], none)) == expected[:2] and stats.num_drafted == 0
    one = none.model_copy(update={"max_speculative_tokens": 1})
    assert token_ids(llm.generate(prompts[:2], one)) == expected[:2]
    assert stats.num_drafted == stats.num_verified > 0

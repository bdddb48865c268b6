"""Speculative steps on the graph path (serve/speculative/graph_passes.py over serve/cuda_graphs.py) on
tiny Gemma 2 and Gemma 3 targets. On the CPU (fast_path="on") the graphs' steps run eagerly with the
same packing and padding the GPU replays: greedy tokens with a draft (fixed K and auto) equal greedy
tokens without, through mixed batches, rows with different caps (max_tokens reached mid-draft,
per-request max_speculative_tokens), preemption and prefix-cache hits; the padded verify pass gives
run_spans' logits on its real rows; the draft's catch-up runs at query length 1 and 2 and greedy
passes chain on the device; every block of both models is free at the end. The `gpu` test captures
the real CUDA graphs; another test runs the padded steps through the Triton prefill kernel, interpreted.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from serve_fixtures import gemma2_config, gemma3_config, random_model, random_prompts, save_model
from test_engine_speculative import SMALL as EAGER
from test_engine_speculative import (assert_all_free, mixed_requests_under_preemption, prefix_cache_hits, run_requests,
                                     slim_child, token_ids)
from test_engine_speculative import speculative as eager_speculative

from serve import LLM, SamplingParams
from serve.metrics import render
from serve.model_runner import Span

NEW_TOKENS = 20
LENGTHS = [3, 30, 12, 21, 9]
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
ON_GRAPHS = {"max_num_batched_tokens": 32, "fast_path": "on", "device": "cpu"}
SMALL = {**EAGER, **ON_GRAPHS}


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def tiny(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = random_model(gemma2_config() if family == "gemma2" else gemma3_config(), seed=3)
    target = save_model(model, root / "target")
    drafts = {"slim": slim_child(model, root / "slim", family), "self": target}
    prompts = random_prompts(LENGTHS)
    plain = LLM(target, **SMALL)
    return target, drafts, prompts, token_ids(plain.generate(prompts, GREEDY)), plain


def speculative(tiny, draft="slim", k="auto", **config):
    return eager_speculative(tiny, draft, k, **{**ON_GRAPHS, **config})


def record_query_lens(graphs) -> list:
    """(query length, chained from the device?) of every step run on `graphs`."""
    calls, run_spans = [], graphs.run_spans

    def recorded(spans, q, src_rows=None):
        calls.append((q, src_rows is not None))
        return run_spans(spans, q, src_rows)
    graphs.run_spans = recorded
    return calls


@pytest.mark.parametrize("k", [1, 2, 3, 4, "auto"])
def test_greedy_on_graphs_equals_plain_greedy(tiny, k):
    _, _, prompts, expected, _ = tiny
    llm = speculative(tiny, k=k)
    engine = llm.engine
    assert engine.runner.verify_graphs is not None and engine.speculator.draft.decode_graphs is not None
    verified = record_query_lens(engine.runner.verify_graphs)
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    stats = engine.speculator.stats
    assert stats.num_graph_steps > 0 and stats.num_eager_steps > 0      # prompts' catch-ups run eagerly
    assert f"{stats.num_graph_steps} steps on graphs" in stats.summary()
    assert f"serve_spec_graph_steps_total {stats.num_graph_steps}\n" in render(engine)
    assert verified and all(2 <= q <= (8 if k == "auto" else k) + 1 for q, _ in verified)
    assert_all_free(llm)


def test_lag_two_catch_up_and_greedy_chain(tiny):
    """The target as its own draft keeps every token: the next catch-up has a lag of 2 (a query of 2 on
    the draft's graphs), and a lag of 1 after a rejection (slim draft); greedy passes chain on the device."""
    _, _, prompts, expected, _ = tiny
    for draft, lag in (("self", 2), ("slim", 1)):
        llm = speculative(tiny, draft, k=3)
        calls = record_query_lens(llm.engine.speculator.draft.decode_graphs)
        assert token_ids(llm.generate(prompts, GREEDY)) == expected
        assert (lag, False) in calls and (1, True) in calls
        assert_all_free(llm)


def test_rows_with_different_caps(tiny):
    """Per-request max_speculative_tokens 0..4 and max_tokens that end drafts mid-way: rows of one verify
    pass are padded to the longest; a row that drafts nothing rides along with n = 0."""
    _, _, prompts, expected, plain = tiny
    llm = speculative(tiny, "self", k=4)
    engine = llm.engine
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, max_speculative_tokens=cap)
              for m, cap in ((NEW_TOKENS, 0), (7, None), (NEW_TOKENS, 1), (11, 2), (NEW_TOKENS, None))]
    for output, want, sp in zip(run_requests(engine, prompts, params), expected, params):
        assert output.outputs[0].token_ids == want[:sp.max_tokens]
    assert engine.speculator.stats.num_graph_steps > 0
    assert_all_free(llm)


def test_mixed_sampling_and_preemption_on_graphs(tiny):
    """Greedy, sampled n=2 (each pass sampled on the host) and logprobs rows (which do not speculate)
    under a KV pool small enough to preempt: greedy rows keep their tokens, every block comes back."""
    _, _, prompts, expected, _ = tiny
    llm = speculative(tiny, "self", k=3, num_kv_blocks=24, max_model_len=64, kv_cache_bytes=None, max_num_seqs=4)
    mixed_requests_under_preemption(llm, prompts, expected, NEW_TOKENS)
    assert llm.engine.speculator.stats.num_graph_steps > 0


def test_preemption_and_prefix_cache_hits_on_graphs(tiny):
    _, _, prompts, expected, _ = tiny
    llm = speculative(tiny, "slim", k=2, num_kv_blocks=20, max_model_len=64, kv_cache_bytes=None)
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert_all_free(llm)
    llm = speculative(tiny, k=2)
    prefix_cache_hits(tiny, llm, GREEDY)
    assert llm.engine.speculator.stats.num_graph_steps > 0


def test_padded_verify_logits_equal_run_spans(tiny):
    """Each graph verify pass, re-run eagerly through run_spans on the same spans: the real rows' logits
    agree (fp32), whatever padding the graph's rows had."""
    _, _, prompts, _, _ = tiny
    llm = speculative(tiny, "slim", k=3)
    speculator = llm.engine.speculator
    original, checked = speculator._verify_on_graphs, []

    def verify(batch, drafts):
        plain, plain_logits, verified = original(batch, drafts)
        got = {d.seq.seq_id: d.target_logits.clone() for d in verified}
        got.update({seq.seq_id: plain_logits[i:i + 1].clone() for i, seq in enumerate(plain)})
        spans = []
        for seq in batch.seqs:
            start = seq.num_computed_tokens
            ids = [seq.token_ids[start]] + (drafts[seq.seq_id].tokens if seq.seq_id in drafts else [])
            spans.append(Span(seq, start, ids, len(ids)))
        eager = speculator.target.run_spans(spans).split([len(span.ids) for span in spans])
        for span, want in zip(spans, eager):
            torch.testing.assert_close(got[span.seq.seq_id], want, rtol=1e-4, atol=1e-4)
        checked.append(max(len(span.ids) for span in spans) > min(len(span.ids) for span in spans))
        return plain, plain_logits, verified

    speculator._verify_on_graphs = verify
    params = [SamplingParams(temperature=0, max_tokens=NEW_TOKENS - 2 * i, ignore_eos=True) for i in range(5)]
    for prompt, p in zip(prompts, params):
        llm.engine.add_request(prompt, p)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert checked and any(checked)            # some passes padded rows of different lengths
    assert_all_free(llm)


def test_startup_line_says_where_passes_run(tiny):
    llm = speculative(tiny, k=2)
    line = llm.engine.startup_report[-1]
    assert "in steps of up to 8 sequences" in line and "no CUDA graphs (cpu device)" in line
    off = speculative(tiny, k=2, max_spec_graph_batch=0)
    assert off.engine.runner.verify_graphs is None and off.engine.speculator.draft.decode_graphs is None
    assert "run eagerly" in off.engine.startup_report[-1]
    _, _, prompts, expected, _ = tiny
    assert token_ids(off.generate(prompts[:2], GREEDY)) == expected[:2]
    assert off.engine.speculator.stats.num_graph_steps == 0


def test_a_failed_capture_of_the_speculative_graphs_is_a_start_up_error(tiny, monkeypatch):
    """Never a silent fallback: the error names the graphs and the flag that avoids them."""
    from serve.cuda_graphs import DecodeGraphs, GraphCaptureError
    from serve.model_runner import ModelRunner

    def capture(self):
        if self.name != "decode":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(ModelRunner, "_use_graphs", lambda self: True)
    monkeypatch.setattr(DecodeGraphs, "_capture", capture)
    with pytest.raises(GraphCaptureError, match="speculative verify CUDA graphs.*out of memory.*--max-spec-graph-batch"):
        speculative(tiny, k=2)
    llm = speculative(tiny, k=2, max_spec_graph_batch=0)
    assert "run eagerly" in llm.engine.startup_report[-1]


GPU_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from serve_fixtures import gemma3_config, random_model, random_prompts, save_model
from test_engine_speculative import slim_child
from serve import LLM, SamplingParams
params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
prompts = random_prompts([3, 30, 12, 21])
model = random_model(gemma3_config(), seed=3)
target = save_model(model, {path!r} + "target")
draft = slim_child(model, {path!r} + "slim", "gemma3")
common = dict(block_size=4, max_num_batched_tokens=64, max_num_seqs=4, dtype="float32", attention_backend="triton",
              fast_path="on", kv_cache_bytes=2**24)     # three engines in one process: each a small cache
plain = [o.outputs[0].token_ids for o in LLM(target, **common).generate(prompts, params)]
for proposer, k in ((draft, 3), (target, 3), (draft, "auto")):      # the target as its own draft: lags of 2
    llm = LLM(target, draft=str(proposer), num_speculative_tokens=k, **common)
    engine = llm.engine
    assert engine.runner.verify_graphs.graphs and engine.speculator.draft.decode_graphs.graphs, "no graphs captured"
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == plain, (k, got, plain)
    stats = engine.speculator.stats
    assert k == "auto" or stats.num_graph_steps > 0, stats.summary()
    assert engine.block_manager.num_used_blocks() == 0
    print(k, "same tokens;", stats.summary(), engine.startup_report[-1])
"""


@pytest.mark.gpu
def test_gpu_speculative_graphs_match_plain_greedy(tmp_path):
    """Real CUDA graphs of the draft and verify passes (Triton kernels, fp32): greedy tokens equal the
    target's own, and speculative steps ran on the graphs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    script = GPU_SCRIPT.format(tests=str(Path(__file__).parent), path=str(tmp_path / "m"))
    env = {**os.environ, "TRITON_F32_DEFAULT": "ieee"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("same tokens") == 3, proc.stdout


INTERPRETER_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from serve_fixtures import gemma2_config, random_model, random_prompts, save_model
from serve import LLM, SamplingParams
path = save_model(random_model(gemma2_config(num_layers=2), seed=3), {path!r})
prompts = random_prompts([3, 13, 20])
params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, max_speculative_tokens=cap) for cap in (3, 1, 2)]
common = dict(block_size=4, max_num_batched_tokens=32, fast_path="on", device="cpu")

def run(llm):
    engine, done = llm.engine, {{}}
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_unfinished_requests():
        done.update({{o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}})
    return [done[i] for i in ids]

plain = run(LLM(path, attention_backend="reference", **common))
llm = LLM(path, draft=path, num_speculative_tokens=3, attention_backend="triton", **common)
got = run(llm)
assert got == plain, (got, plain)
assert llm.engine.speculator.stats.num_graph_steps > 0 and llm.engine.block_manager.num_used_blocks() == 0
print("same tokens", llm.engine.speculator.stats.summary())
"""


def test_padded_steps_on_the_triton_prefill_kernel(tmp_path):
    """The graphs' padded verify and catch-up steps through the Triton paged prefill kernel (interpreted on
    the CPU): padding past the real tokens, table rows zeroed past a sequence's blocks, a sliding window."""
    pytest.importorskip("triton")
    script = INTERPRETER_SCRIPT.format(tests=str(Path(__file__).parent), path=str(tmp_path / "m"))
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "same tokens" in proc.stdout, proc.stdout

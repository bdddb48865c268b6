"""The fast-path code (fused projections/norms/rope, bucketed decode over packed persistent buffers,
serve/cuda_graphs.py) gives the reference path's greedy tokens. On CPU the decode buckets run eagerly
(no CUDA graphs), with the same packing, padding and block-table caching the GPU replays use; the
`gpu` test runs the real CUDA graphs against the reference path and Hugging Face `generate`.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serve import LLM, SamplingParams
from serve.cuda_graphs import graph_buckets
from serve_fixtures import gemma2_config, gemma3_config, hf_greedy, random_model, random_prompts, save_model

NEW_TOKENS = 8
LENGTHS = [3, 30, 12, 21, 9, 17]
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_graph_buckets_cover_every_batch_size():
    buckets = graph_buckets(100)
    assert buckets[:4] == [1, 2, 4, 8] and buckets[-1] == 100
    for size in range(1, 101):
        bucket = next(b for b in buckets if b >= size)
        assert bucket < 2 * size + 1 and bucket - size < 32


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_fast_path_matches_reference_and_hf_on_cpu(tmp_path, family):
    model = random_model(gemma2_config() if family == "gemma2" else gemma3_config(), seed=3)
    path = save_model(model, tmp_path / family)
    prompts = random_prompts(LENGTHS)
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    # max_graph_batch 4 < 6 requests: wide decode steps fall back to the eager path, narrow ones
    # are padded into buckets; block_size 4 makes tables grow and sliding blocks free mid-run. On the CPU
    # on a GPU machine too: the fp32 HF tokens are matched at fp32 (the `gpu` test below covers CUDA).
    llm = LLM(path, block_size=4, max_num_batched_tokens=16, max_num_seqs=8, fast_path="on", max_graph_batch=4,
              device="cpu")
    runner = llm.engine.runner
    assert runner.decode_graphs is not None and not runner.decode_graphs.graphs
    assert hasattr(runner.model.model.layers[0].self_attn, "qkv_proj")
    calls = []
    original = runner.decode_graphs.run
    runner.decode_graphs.run = lambda seqs, *ahead: calls.append(len(seqs)) or original(seqs, *ahead)
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    assert calls and any(n not in graph_buckets(4) for n in calls)     # some steps ran padded
    assert llm.engine.block_manager.num_used_blocks() == 0


def test_fast_path_preemption_and_prefix_cache(tmp_path):
    model = random_model(gemma2_config(), seed=4)
    path = save_model(model, tmp_path / "m")
    prompts = random_prompts(LENGTHS, seed=2)
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    llm = LLM(path, block_size=4, max_num_batched_tokens=16, num_kv_blocks=12, max_model_len=48, fast_path="on")
    assert token_ids(llm.generate(prompts, GREEDY)) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert token_ids(llm.generate(prompts[:2], GREEDY)) == expected[:2]      # prefix-cache hits
    assert llm.engine.block_manager.num_used_blocks() == 0


def test_incremental_packing_equals_packing_from_scratch(tmp_path):
    """Rows of the persistent decode buffer are rewritten only when their sequence or its table changed;
    at every step they must hold what packing from scratch writes (preemption, sliding frees, n > 1).
    A step launched ahead has no ids on the host: its source rows must point at the same sequence
    in the step packed before it."""
    import numpy as np

    from serve.block_manager import FREED

    model = random_model(gemma2_config(), seed=5)
    path = save_model(model, tmp_path / "m")
    llm = LLM(path, block_size=4, max_num_batched_tokens=16, num_kv_blocks=14, max_model_len=48, fast_path="on",
              device="cpu")     # the packing is checked against host tensors
    graphs, checked, previous, header_only = llm.engine.runner.decode_graphs, [], [], []
    original = graphs.pack

    def checked_pack(seqs, src_rows=None):
        bucket = original(seqs, src_rows)
        views = graphs.np
        for i, seq in enumerate(seqs):
            pos = seq.num_computed_tokens
            assert (views["positions"][i], views["seq_lens"][i]) == (pos, pos + 1)
            if src_rows is None:
                assert views["ids"][i] == seq.token_ids[pos]
            else:
                assert previous[-1][views["src_rows"][i]] is seq and pos == len(seq.token_ids)
            for key in graphs.keys:
                table = np.asarray(seq.block_tables[key])
                live = table != FREED          # freed sliding entries may be stale: never read
                assert (views[("tables", key)][i, :len(table)][live] == table[live]).all()
                assert views[("slots", key)][i] == table[pos // 4] * 4 + pos % 4
        assert (views["seq_lens"][len(seqs):bucket] == 1).all()
        checked.append(src_rows is not None)
        header_only.append(not graphs.tables_dirty)
        previous.append(list(seqs))
        return bucket

    graphs.pack = checked_pack
    original_run = graphs.run

    def checked_run(seqs, prev_tokens=None, src_rows=None):
        # the copy moves the tables only when they changed: afterwards the device holds all of the host's
        logits = original_run(seqs, prev_tokens, src_rows)
        assert torch.equal(graphs.device_buf, graphs.host)
        assert torch.equal(graphs.argmax, logits.argmax(dim=1))
        return logits

    graphs.run = checked_run
    params = SamplingParams(temperature=0.8, seed=1, n=2, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate(random_prompts(LENGTHS, seed=3), params)
    assert len(checked) > NEW_TOKENS and llm.engine.scheduler.num_preemptions > 0
    llm.generate(random_prompts(LENGTHS, seed=4), GREEDY)                   # steps launched ahead
    assert any(checked) and not all(checked)
    assert any(header_only) and not all(header_only)


GPU_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from serve_fixtures import gemma2_config, gemma3_config, hf_greedy, random_model, random_prompts, save_model
from serve import LLM, SamplingParams
params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
prompts = random_prompts([3, 30, 12, 21, 9, 17, 40, 5])

def no_sync(launch):
    # launching a step ahead must never wait for the device (only reading a step's tokens may)
    def guarded(*args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return guarded

for name, config in (("gemma2", gemma2_config()), ("gemma3", gemma3_config())):
    model = random_model(config, seed=3)
    path = save_model(model, {path!r} + name)
    hf = [hf_greedy(model, p, 12) for p in prompts]     # fp32 on the CPU
    def run(p=params, **kw):
        llm = LLM(path, block_size=4, max_num_batched_tokens=32, max_num_seqs=8, dtype="float32", **kw)
        llm.engine.lookahead.launch_next = no_sync(llm.engine.lookahead.launch_next)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, p)], llm.engine
    reference, _ = run(attention_backend="reference", fast_path="off")
    fast, engine = run(attention_backend="triton", fast_path="on")
    assert engine.runner.decode_graphs.graphs, "no CUDA graphs were captured"
    assert engine.lookahead.num_ahead > 0, "no decode step was launched ahead"
    assert reference == hf, (name, reference, hf)
    assert fast == reference, (name, fast, reference)
    # sequences stopping at different steps: the overlapped graphs discard their extra tokens
    stopped = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[hf[0][9], hf[3][8]])
    ref_stop, _ = run(stopped, attention_backend="reference", fast_path="off")
    sync_stop, _ = run(stopped, attention_backend="triton", fast_path="on", overlap=False)
    fast_stop, engine = run(stopped, attention_backend="triton", fast_path="on")
    assert fast_stop == sync_stop == ref_stop, (name, fast_stop, sync_stop, ref_stop)
    assert engine.lookahead.num_discarded > 0 and engine.block_manager.num_used_blocks() == 0
    sampled = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=12, ignore_eos=True)
    tokens, engine = run(sampled, attention_backend="triton", fast_path="on")
    assert engine.lookahead.num_ahead > 0 and all(len(t) == 12 for t in tokens)
    print(name, "same tokens")
"""


@pytest.mark.gpu
def test_gpu_fast_path_matches_reference_and_hf(tmp_path):
    """Real CUDA graphs + Triton kernels vs the torch reference path and HF, fp32 (IEEE dots in Triton)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    script = GPU_SCRIPT.format(tests=str(Path(__file__).parent), path=str(tmp_path / "m"))
    env = {**os.environ, "TRITON_F32_DEFAULT": "ieee"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("same tokens") == 2


PINNED_SCRIPT = """
import sys
import torch
torch.cuda.is_available = lambda: True      # a GPU machine, as far as choosing the kernel backend goes
sys.path.insert(0, {tests!r})
from serve_fixtures import gemma2_config, hf_greedy, random_model, random_prompts, save_model
from serve import LLM, SamplingParams
from compress import kernels
model = random_model(gemma2_config(), seed=6)
path = save_model(model, {path!r})
prompts = random_prompts([3, 30, 12])
expected = [hf_greedy(model, p, 6) for p in prompts]
llm = LLM(path, block_size=4, max_num_batched_tokens=16, fast_path="on", device="cpu")
got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6,
                                                                             ignore_eos=True))]
assert kernels.backend_name() == "triton" and got == expected, (got, expected)
print("same tokens")
"""


def test_engine_pinned_to_the_cpu_where_cuda_is_present(tmp_path):
    """`device="cpu"` on a GPU machine: the kernel backend is Triton there, and the fast path's ops get host
    tensors, which compiled kernels cannot read (they must run the reference). Simulated here by making
    torch report CUDA, with the Triton interpreter off."""
    script = PINNED_SCRIPT.format(tests=str(Path(__file__).parent), path=str(tmp_path / "m"))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KERNELS_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "same tokens" in proc.stdout

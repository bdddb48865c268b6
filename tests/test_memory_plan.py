"""KV cache memory planning (issue 33, problems 4 and 6): `--kv-cache-memory` with a unit is bytes; on the
GPU the KV cache gets what is left once a worst-case step and the decode graphs fit (the arithmetic,
with measured numbers faked); a decode-graph capture that fails is a loud start-up error, never a silent
eager fallback; start-up reports the KV blocks and tokens and the decode mode, and /metrics shows them.
The `gpu` test measures the real profile on CUDA."""

from __future__ import annotations

import gc

import pytest
import torch

from compress.cli import main
from serve import LLM, SamplingParams
from serve.config import EngineConfig, parse_kv_cache_memory
from serve.cuda_graphs import GraphCaptureError, graph_buckets
from serve.memory import MemoryProfile, kv_budget, worst_step
from serve_fixtures import gemma2_config, random_model, random_prompts, save_model

GiB = 2**30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_model(random_model(gemma2_config(), seed=2), tmp_path_factory.mktemp("mem") / "m")


@pytest.mark.parametrize("text, fields", [
    ("0.05GB", {"kv_cache_bytes": 50_000_000}),      # issue 33: was read as the fraction 0.05
    ("4GB", {"kv_cache_bytes": 4 * 10**9}), ("4 GiB", {"kv_cache_bytes": 4 * GiB}), ("4G", {"kv_cache_bytes": 4 * GiB}),
    ("512MB", {"kv_cache_bytes": 512 * 10**6}), ("512mib", {"kv_cache_bytes": 512 * 2**20}),
    ("0.9", {"kv_cache_memory": 0.9}), ("1", {"kv_cache_memory": 1.0}),
])
def test_a_unit_means_bytes_a_bare_number_a_fraction(text, fields):
    assert parse_kv_cache_memory(text) == fields


@pytest.mark.parametrize("text, message", [("4", "give the unit"), ("0", "must be"), ("-1GB", "must be"),
                                           ("4XB", "must be"), ("GB", "must be"), ("nan", "must be")])
def test_ambiguous_or_malformed_sizes_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_kv_cache_memory(text)


def _serve(monkeypatch, argv) -> tuple[int, list]:
    import serve.server
    served = []
    monkeypatch.setattr(serve.server, "serve_forever", lambda engine, *a, **k: served.append(engine))
    return main(["serve", *argv]), served


def test_serve_with_a_size_in_gb_gets_that_many_bytes(tiny, monkeypatch, capsys):
    # 1,024 sequences of 128 tokens would want 64 MiB of blocks; 0.05GB must stop the cache at 50e6 bytes
    code, served = _serve(monkeypatch, [str(tiny), "--device", "cpu", "--max-num-seqs", "1024",
                                        "--kv-cache-memory", "0.05GB"])
    assert code == 0
    stacks = served[0].runner.kv_stacks.values()
    kv_bytes = sum(t.numel() * t.element_size() for group in stacks for t in group)
    assert 0.95 * 50e6 < kv_bytes <= 50e6
    out = capsys.readouterr().out
    assert "KV cache: " in out and " blocks (" in out and " tokens)" in out and "decode: eager" in out


def test_serve_refuses_a_bare_number_above_one(tiny, monkeypatch, capsys):
    capsys.readouterr()
    code, served = _serve(monkeypatch, [str(tiny), "--device", "cpu", "--kv-cache-memory", "4"])
    err = capsys.readouterr().err
    assert code == 2 and not served and err.count("\n") == 1 and "4GB or 4GiB" in err


def test_the_budget_leaves_room_for_a_step_and_the_graphs():
    config = EngineConfig(model="m")
    profile = MemoryProfile(free_bytes=70 * GiB, step_bytes=3 * GiB, graph_bytes=GiB)
    assert kv_budget(config, profile) == int(0.9 * 70 * GiB) - 4 * GiB
    config = EngineConfig(model="m", kv_cache_memory=0.5)
    assert kv_budget(config, profile) == 35 * GiB - 4 * GiB


def test_an_exact_size_must_fit_beside_a_step_and_the_graphs():
    profile = MemoryProfile(free_bytes=70 * GiB, step_bytes=3 * GiB, graph_bytes=GiB)
    assert kv_budget(EngineConfig(model="m", kv_cache_bytes=40 * GiB), profile) == 40 * GiB
    with pytest.raises(ValueError, match="does not fit"):
        kv_budget(EngineConfig(model="m", kv_cache_bytes=67 * GiB), profile)
    with pytest.raises(ValueError, match="no memory is left"):
        kv_budget(EngineConfig(model="m", kv_cache_memory=0.05), profile)


@pytest.mark.parametrize("tokens, seqs, max_len", [(8192, 256, 2048), (2048, 64, 4096), (100, 64, 8), (16, 64, 48)])
def test_the_profile_step_is_the_largest_a_scheduler_can_make(tokens, seqs, max_len):
    config = EngineConfig(model="m", max_num_batched_tokens=tokens, max_num_seqs=seqs)
    batch = worst_step(config, max_len, [None, 8])
    assert len(batch) == min(seqs, tokens) == batch.num_sampling and all(batch.sampling)
    assert sum(batch.num_new_tokens) == min(tokens, len(batch) * (max_len - 1))
    assert max(batch.num_new_tokens) <= max_len - 1 and batch.max_num_new_tokens == max(batch.num_new_tokens)
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        assert len(seq.token_ids) == n and set(seq.block_tables) == {None, 8}
        assert len(seq.block_tables[None]) * config.block_size >= n


def test_the_cache_is_sized_from_what_a_profiled_step_leaves(tiny, monkeypatch):
    """The CUDA start-up on the CPU with a fake memory reader: 60 MiB free after the weights and a step
    peaking 10 MiB above its start: the cache gets 0.9 * 60 - 10 MiB, after the worst step really ran."""
    from serve import memory
    from serve.model_runner import ModelRunner

    MiB, rows = 2**20, []
    for name, fake in [("synchronize", lambda *a: None), ("empty_cache", lambda: None),
                       ("reset_peak_memory_stats", lambda *a: None), ("memory_allocated", lambda *a: 5 * MiB),
                       ("max_memory_allocated", lambda *a: 15 * MiB), ("mem_get_info", lambda *a: (60 * MiB, 80 * MiB))]:
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(memory, "sample", lambda logits, seqs: rows.append(logits.shape[0]))
    monkeypatch.setattr(ModelRunner, "_profile", lambda self, use_graphs: memory.profile(self, None))
    llm = LLM(tiny, device="cpu", max_num_seqs=1024, max_num_batched_tokens=64)
    runner = llm.engine.runner
    assert rows == [64, 64]                     # twice, every one of the 64 sequences of the worst step sampling
    assert runner.memory == MemoryProfile(free_bytes=60 * MiB, step_bytes=10 * MiB, graph_bytes=0)
    kv = sum(t.numel() * t.element_size() for group in runner.kv_stacks.values() for t in group)
    budget = int(0.9 * 60 * MiB) - 10 * MiB     # both groups are below their caps: the budget binds
    assert budget - 2 * 16 * 2**10 < kv <= budget
    assert "free after the weights; one step needs 10.0 MiB" in llm.engine.startup_report[1]
    out = llm.generate(random_prompts([5, 9]), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]


def _force_graphs(monkeypatch, error=None):
    """On the CPU: take the CUDA-graph path, with `error` raised where capture would sync the device."""
    from serve import cuda_graphs
    from serve.model_runner import ModelRunner

    def synchronize(*args):
        raise error

    monkeypatch.setattr(ModelRunner, "_fast_path_on", lambda self: True)
    monkeypatch.setattr(ModelRunner, "_use_graphs", lambda self: not self.config.enforce_eager)
    monkeypatch.setattr(cuda_graphs.torch.cuda, "synchronize", synchronize)


def test_a_failed_capture_is_a_start_up_error(tiny, monkeypatch):
    _force_graphs(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(GraphCaptureError, match="CUDA out of memory.*--enforce-eager"):
        LLM(tiny, device="cpu", fast_path="on", max_num_seqs=4)


def test_serve_says_so_in_one_line_and_exits_2(tiny, monkeypatch, capsys):
    _force_graphs(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    capsys.readouterr()
    code, served = _serve(monkeypatch, [str(tiny), "--device", "cpu", "--max-num-seqs", "4"])
    err = capsys.readouterr().err
    assert code == 2 and not served and err.count("\n") == 1
    assert "capturing the decode CUDA graphs (batch sizes up to 4" in err and "Traceback" not in err


def test_enforce_eager_decodes_eagerly_and_says_so(tiny, monkeypatch):
    from serve.metrics import render
    _force_graphs(monkeypatch, AssertionError("no capture under --enforce-eager"))
    llm = LLM(tiny, device="cpu", fast_path="on", max_num_seqs=4, enforce_eager=True, num_kv_blocks=64)
    engine = llm.engine
    assert engine.runner.num_graphs == 0 and engine.startup_report[-1] == "decode: eager, no CUDA graphs (--enforce-eager)"
    page = render(engine)
    assert "\nserve_cuda_graphs_captured 0\n" in page
    assert f"\nserve_kv_cache_tokens {64 * engine.config.block_size}\n" in page
    assert "full attention: 64 blocks (1,024 tokens)" in engine.startup_report[0]
    out = llm.generate(random_prompts([5, 9]), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]


@pytest.mark.gpu
def test_gpu_profile_measures_the_step_and_the_graphs_before_the_cache(tiny):
    """Two engines in one process, the first freed: both capture, and the second sees the memory again."""
    runs = []
    for _ in range(2):
        llm = LLM(tiny, max_num_seqs=16, max_model_len=128)
        runner = llm.engine.runner
        assert runner.num_graphs == len(graph_buckets(16)) and runner.memory.graph_bytes > 0
        assert runner.memory.step_bytes > 0
        kv = sum(t.numel() * t.element_size() for group in runner.kv_stacks.values() for t in group)
        assert kv <= kv_budget(llm.engine.config, runner.memory)
        out = llm.generate(random_prompts([5, 40]), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        runs.append((runner.memory.free_bytes, [o.outputs[0].token_ids for o in out]))
        del llm, runner
        gc.collect()
        torch.cuda.empty_cache()
    assert runs[0][1] == runs[1][1]
    assert abs(runs[1][0] - runs[0][0]) < 256 * 2**20      # the first engine and its trial graphs were freed
    with pytest.raises(ValueError, match="does not fit"):
        LLM(tiny, max_num_seqs=16, max_model_len=128, kv_cache_bytes=torch.cuda.mem_get_info()[0])

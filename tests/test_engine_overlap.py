"""The overlapped decode loop (serve/lookahead.py) gives the synchronous loop's tokens.

On the CPU the fast path's decode buckets run eagerly, so the same lookahead code runs: step N+1 is
launched with step N's sampled tokens gathered on the device before the host appends them. Greedy
outputs with overlap on must equal overlap off through sequences stopping mid-run (EOS-like stop ids,
max_tokens, the context limit), preemption with a tiny KV cache, prefix-cache hits, n > 1 forks, aborts
and requests arriving while a step is in flight; prefix-cached blocks are never written; discarded
tokens are not counted; every block is free at the end.
"""

import pytest
import torch

from serve.block_manager import BlockManager
from serve.config import EngineConfig
from serve.engine import LLMEngine
from serve.sampling_params import SamplingParams
from serve.sequence import Sequence
from serve_fixtures import gemma2_config, random_model, random_prompts, save_model

LENGTHS = [3, 30, 12, 21, 9, 17]
BASE = dict(block_size=4, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64, device="cpu",
            fast_path="on")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_model(random_model(gemma2_config(num_layers=2), seed=7), tmp_path_factory.mktemp("overlap"))


def make_engine(path, overlap: bool, stream: bool = False, **config) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=str(path), overlap=overlap, **(BASE | config)))
    engine.stream_outputs = stream
    return engine


def drain(engine, done: dict) -> None:
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out


def generate(path, prompts, params, overlap: bool, **config):
    """Outputs (token ids, finish reason) per request in order, and the engine."""
    engine = make_engine(path, overlap, **config)
    ids = [engine.add_request(p, params[i % len(params)]) for i, p in enumerate(prompts)]
    done: dict = {}
    drain(engine, done)
    result = [[(o.token_ids, o.finish_reason) for o in done[i].outputs] for i in ids]
    assert engine.block_manager.num_used_blocks() == 0
    assert engine.metrics.generation_tokens == sum(len(t) for r in result for t, _ in r)
    return result, engine


def stopping_params(path, prompts) -> list[SamplingParams]:
    """Per request: max_tokens from 5 to 34, and for half of them a stop id taken from the middle of
    their own greedy output, so sequences stop on tokens and on length at different steps."""
    free_run, _ = generate(path, prompts, [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)], False)
    params = []
    for i, [(tokens, _)] in enumerate(free_run):
        stop = [tokens[2 + 3 * i % 20]] if i % 2 == 0 else []
        params.append(SamplingParams(temperature=0, max_tokens=[9, 34, 7, 12, 25, 5][i], stop_token_ids=stop,
                                     ignore_eos=True))
    return params


def test_overlap_matches_sync_with_mid_run_stops(tiny_path):
    prompts = random_prompts(LENGTHS, seed=11)
    params = stopping_params(tiny_path, prompts)
    sync, _ = generate(tiny_path, prompts, params, overlap=False)
    overlapped, engine = generate(tiny_path, prompts, params, overlap=True)
    assert overlapped == sync
    reasons = [r[0][1] for r in sync]
    assert "stop" in reasons and "length" in reasons
    assert engine.lookahead.num_ahead > 20 and engine.lookahead.num_discarded > 0
    # request 1 (30 prompt + 34 new tokens) ends exactly at the context limit, never decoding past it
    assert len(prompts[1]) + len(sync[1][0][0]) == 64


def test_overlap_off_and_slow_path_never_look_ahead(tiny_path):
    prompts = random_prompts(LENGTHS[:3], seed=12)
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    _, off = generate(tiny_path, prompts, params, overlap=False)
    _, eager = generate(tiny_path, prompts, params, overlap=True, fast_path="off")
    assert off.lookahead.num_ahead == 0 and eager.lookahead.num_ahead == 0
    assert not eager.lookahead.enabled


def test_overlap_with_preemption_and_prefix_cache_hits(tiny_path):
    prompts = random_prompts(LENGTHS, seed=13)
    prompts += [prompts[1][:24] + prompts[0], prompts[3][:16] + prompts[2]]      # shared prefixes
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 14, 4, 11)]
    tight = dict(num_kv_blocks=16, max_model_len=48)
    sync, sync_engine = generate(tiny_path, prompts, params, overlap=False, **tight)
    overlapped, engine = generate(tiny_path, prompts, params, overlap=True, **tight)
    assert overlapped == sync
    assert sync_engine.scheduler.num_preemptions > 0 and engine.scheduler.num_preemptions > 0
    assert engine.scheduler.num_cached_tokens > 0 and engine.lookahead.num_ahead > 0


def test_prefix_cached_blocks_are_never_written(tiny_path):
    """Every block holding a prefix-cache hash keeps its KV through every launch, synchronous or
    ahead, including the discarded steps of sequences that stopped (CPU: a launch completes at once)."""
    prompts = random_prompts(LENGTHS, seed=14)
    prompts += [p[:len(p) // 2 * 2] + [9, 10, 11] for p in prompts[:3]]
    params = stopping_params(tiny_path, prompts[:6])
    engine = make_engine(tiny_path, overlap=True, num_kv_blocks=40)
    runner, checked = engine.runner, []

    def guarded(launch):
        def run(*args):
            before = cached_kv(engine)
            out = launch(*args)
            after = cached_kv(engine)
            assert all(torch.equal(before[k], after[k]) for k in before)
            checked.append(len(before))
            return out
        return run

    runner.run, runner.run_ahead = guarded(runner.run), guarded(runner.run_ahead)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params[(i + 2 * (i // 6)) % 6])
    drain(engine, {})
    assert sum(checked) > 50 and engine.lookahead.num_discarded > 0


def cached_kv(engine) -> dict:
    kv = {}
    for key, pool in engine.block_manager.pools.items():
        for block in pool.block_to_hash:
            kv[key, block] = torch.cat([stack[:, :, block].flatten() for stack in engine.runner.kv_stacks[key]])
    return kv


def test_forks_logprobs_and_stop_strings_fall_back(tiny_path):
    prompts = random_prompts(LENGTHS[:4], seed=15)
    mixed = [SamplingParams(temperature=0, n=2, max_tokens=9, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=["zz"]),
             SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)]
    sync, _ = generate(tiny_path, prompts, mixed, overlap=False)
    overlapped, engine = generate(tiny_path, prompts, mixed, overlap=True)
    assert overlapped == sync and sync[0][0] == sync[0][1]          # n = 2 greedy samples agree
    assert engine.block_manager.num_copies > 0                      # the forks copied on write
    only_logprobs, engine = generate(tiny_path, prompts, [mixed[1]], overlap=True)
    assert engine.lookahead.num_ahead == 0
    forks, engine = generate(tiny_path, prompts, [mixed[0]], overlap=True)
    assert engine.lookahead.num_ahead > 0                           # the forked children overlap


def test_streaming_abort_and_late_arrivals(tiny_path):
    """Streamed outputs, one request aborted and two added while a step is in flight: the survivors'
    tokens equal the synchronous loop's, the aborted request's outputs stop, every block is freed."""
    prompts = random_prompts(LENGTHS + [6, 14], seed=16)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runs = {}
    for overlap in (False, True):
        engine, done, seen = make_engine(tiny_path, overlap, stream=True), {}, []
        for i, prompt in enumerate(prompts[:6]):
            engine.add_request(prompt, params, f"r{i}")
        for step in range(40):
            if step == 5:
                engine.abort_request("r2")
            if step == 7:
                engine.add_request(prompts[6], params, "r6")
                engine.add_request(prompts[7], params, "r7")
            for out in engine.step():
                seen.append(out.request_id)
                done[out.request_id] = out
        drain(engine, done)
        assert engine.block_manager.num_used_blocks() == 0
        runs[overlap] = ({k: v.outputs[0].token_ids for k, v in done.items()}, seen.count("r2"))
        if overlap:
            assert engine.lookahead.num_ahead > 0
    assert runs[True] == runs[False]


def test_temperature_sampling_overlaps(tiny_path):
    prompts = random_prompts(LENGTHS, seed=17)
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_tokens=10, ignore_eos=True)]
    out, engine = generate(tiny_path, prompts, params, overlap=True)
    assert engine.lookahead.num_ahead > 0
    assert all(len(r[0][0]) == 10 and r[0][1] == "length" for r in out)


def test_reserve_next_slot_allocates_ahead_or_changes_nothing():
    manager = BlockManager({None: 3}, 4)
    seq = Sequence("a", [1, 2, 3, 4], SamplingParams())
    manager.allocate(seq, 0, 4)
    seq.num_computed_tokens = 4
    assert manager.reserve_next_slot(seq)                   # block boundary: a new block is taken
    assert len(seq.block_tables[None]) == 2 and manager.pools[None].num_free == 1
    assert manager.reserve_next_slot(seq) and len(seq.block_tables[None]) == 2     # already there
    assert manager.append_slots(seq, 1) == [] and len(seq.block_tables[None]) == 2  # the scheduler agrees
    seq.num_computed_tokens = 5
    child = seq.fork(1)
    manager.fork(seq, child)
    assert not manager.reserve_next_slot(child)             # shared partial block: copy-on-write first
    seq.num_computed_tokens = child.num_computed_tokens = 8
    free = manager.pools[None].num_free
    assert manager.reserve_next_slot(seq) and not manager.reserve_next_slot(child)   # pool ran out
    assert manager.pools[None].num_free == free - 1 and len(child.block_tables[None]) == 2


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_match_sync(tiny_path, seed):
    """Random block sizes, budgets, pool sizes, graph widths, prefix caching, stop ids, n = 2, logprobs,
    aborts and late arrivals: the overlapped loop returns the synchronous loop's outputs."""
    import random
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    config = dict(block_size=bs, max_num_batched_tokens=rng.choice([8, 16, 64]), max_num_seqs=rng.choice([2, 4, 8]),
                  num_kv_blocks=rng.choice([64 // bs + 2, 64 // bs * 3]), max_graph_batch=rng.choice([None, 2, 4]),
                  enable_prefix_caching=rng.random() < 0.7)
    requests = {}
    for i in range(6):
        prompt = [rng.randrange(5, 300) for _ in range(rng.randint(1, 30))]
        kind = rng.random()
        params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 20), ignore_eos=rng.random() < 0.5,
                                stop_token_ids=[rng.randrange(5, 300) for _ in range(rng.randint(0, 30))],
                                n=2 if kind < 0.15 else 1, logprobs=1 if 0.15 <= kind < 0.25 else None)
        requests[f"r{i}"] = (prompt, params, rng.choice([0, 0, 0, rng.randint(1, 10)]), rng.choice([None] * 4 + [5]))
    (sync, _), (overlapped, num_ahead) = [replay(tiny_path, requests, config, overlap) for overlap in (False, True)]
    assert overlapped == sync and num_ahead > 0


def replay(path, requests: dict, config: dict, overlap: bool) -> tuple[dict, int]:
    """Run `requests` (prompt, params, arrival step, abort step or None): finished outputs by id, and
    the number of steps launched ahead."""
    engine, done, step = make_engine(path, overlap, **config), {}, 0
    while step <= 10 or engine.has_unfinished_requests():
        for rid, (prompt, params, arrival, abort) in requests.items():
            if arrival == step:
                engine.add_request(prompt, params, rid)
            if abort == step:
                engine.abort_request(rid)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [(o.token_ids, o.finish_reason) for o in out.outputs]
        step += 1
    assert engine.block_manager.num_used_blocks() == 0
    return done, engine.lookahead.num_ahead

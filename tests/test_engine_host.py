"""The host-side shortcuts of the decode loop equal the full computations they skip.

- Scheduler: decodes whose next slot is ready skip `can_append`/`append_slots`; a twin scheduler that
  always takes the full path must produce the same batches, block tables and pool state, step by step,
  through chunked prefill, forks (copy-on-write), preemption and sliding-window frees.
- The batch's recorded sampling flags equal the from-scratch definition.
- Engine: precomputed stop sets / token limits and the offline "finished only" outputs give the same
  results as streamed outputs, with n > 1, stop tokens and max_tokens.
"""

import random

import pytest

from serve.block_manager import FREED, BlockManager
from serve.config import EngineConfig
from serve.sampling_params import SamplingParams
from serve.scheduler import Scheduler
from serve.sequence import Sequence
from serve_fixtures import gemma2_config, random_model, random_prompts, save_model

BS, WINDOW = 4, 6


def make_scheduler(full_path: bool) -> Scheduler:
    config = EngineConfig(model="unused", block_size=BS, max_num_batched_tokens=10, max_num_seqs=6)
    manager = BlockManager({None: 22, WINDOW: 14}, BS)
    if full_path:
        manager.has_next_slot = lambda seq: False
    return Scheduler(config, manager)


def fake_step(scheduler: Scheduler, rng: random.Random) -> tuple:
    """One engine step with a fake model; returns what must match between the two schedulers."""
    batch = scheduler.schedule()
    expected = [s.num_computed_tokens + n == s.num_tokens for s, n in zip(batch.seqs, batch.num_new_tokens)]
    assert batch.sampling == expected and batch.num_sampling == sum(expected)
    scheduler.advance(batch)
    sampled = [s for s, flag in zip(batch.seqs, batch.sampling) if flag]
    for seq in list(sampled):
        if not seq.forked:
            sampled += scheduler.fork(seq)
    for seq in sampled:
        seq.token_ids.append(rng.randrange(5, 50))
        if seq.num_output_tokens >= seq.params.max_tokens:
            scheduler.finish(seq, "length")
    return snapshot(scheduler, batch)


def snapshot(scheduler: Scheduler, batch) -> tuple:
    name = lambda s: (s.request_id, s.sample_index)   # noqa: E731 (seq ids differ between twins)
    tables = {name(s): dict(s.block_tables) for s in scheduler.running}
    pools = {k: (p.num_free, list(p.ref_counts)) for k, p in scheduler.block_manager.pools.items()}
    return ([name(s) for s in batch.seqs], batch.num_new_tokens, batch.copies, batch.sampling,
            tables, pools, scheduler.num_preemptions)


def check_window_frees(scheduler: Scheduler) -> None:
    """From scratch: a sliding table is FREED exactly below its first needed block."""
    manager = scheduler.block_manager
    for seq in scheduler.running:
        table = seq.block_tables.get(WINDOW, [])
        first = manager._first_needed_block(WINDOW, seq.num_computed_tokens)
        assert all(b == FREED for b in table[:first]) and FREED not in table[first:]


def add_requests(scheduler: Scheduler, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(7):
        params = SamplingParams(max_tokens=rng.randint(3, 12), n=2 if i % 3 == 0 else 1)
        scheduler.add(Sequence(f"r{i}", [rng.randrange(5, 50) for _ in range(rng.randint(2, 17))], params))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_shortcut_matches_full_block_checks(seed):
    fast, full = make_scheduler(False), make_scheduler(True)
    add_requests(fast, seed)
    add_requests(full, seed)
    rng_fast, rng_full = random.Random(seed), random.Random(seed)
    steps, copies = 0, 0
    while fast.has_unfinished():
        state = fake_step(fast, rng_fast)
        assert state == fake_step(full, rng_full)
        check_window_frees(fast)
        steps, copies = steps + 1, copies + len(state[2])
        assert steps < 500
    assert not full.has_unfinished()
    assert fast.num_preemptions > 0 and copies > 0         # the workload reached both slow paths
    assert fast.block_manager.num_used_blocks() == 0


def test_next_slot_is_refused_when_shared_or_at_a_block_boundary():
    manager = BlockManager({None: 8}, BS)
    seq = Sequence("a", [1, 2, 3, 4, 5, 6], SamplingParams())
    manager.allocate(seq, 0, 6)
    seq.num_computed_tokens = 6
    assert manager.has_next_slot(seq)                      # slot 6 is in block 1, owned alone
    child = seq.fork(1)
    manager.fork(seq, child)
    assert not manager.has_next_slot(seq) and not manager.has_next_slot(child)   # copy-on-write first
    assert manager.append_slots(child, 1)                  # the child copies; the parent owns block 1 again
    assert manager.has_next_slot(seq)
    seq.num_computed_tokens = 8
    assert not manager.has_next_slot(seq)                  # a new block is needed


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_model(random_model(gemma2_config(num_layers=2), seed=5), tmp_path_factory.mktemp("host"))


def run_engine(path, prompts, params, stream: bool):
    from serve.engine import LLMEngine
    engine = LLMEngine(EngineConfig(model=str(path), block_size=4, max_num_batched_tokens=16, num_kv_blocks=40,
                                    max_model_len=64, device="cpu"))
    engine.stream_outputs = stream
    ids = [engine.add_request(p, params[i % len(params)]) for i, p in enumerate(prompts)]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert engine.block_manager.num_used_blocks() == 0
    return [[(o.token_ids, o.text, o.finish_reason) for o in done[i].outputs] for i in ids]


def test_offline_outputs_equal_streamed_ones(tiny_path):
    prompts = random_prompts([5, 19, 11, 7, 26, 3])
    params = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=7, stop_token_ids=list(range(100, 180))),
              SamplingParams(temperature=1.0, seed=4, max_tokens=12)]
    streamed = run_engine(tiny_path, prompts, params, stream=True)
    offline = run_engine(tiny_path, prompts, params, stream=False)
    assert offline == streamed
    assert [len(o) for o in offline] == [1, 3, 1, 1, 3, 1]
    stop_ids = set(params[1].stop_token_ids)
    for tokens, _, reason in offline[1] + offline[4]:       # the precomputed stop set and token limit
        if reason == "stop":
            assert tokens[-1] in stop_ids and not stop_ids & set(tokens[:-1])
        else:
            assert reason == "length" and len(tokens) == 7 and not stop_ids & set(tokens)
    assert "stop" in {o[2] for o in offline[1] + offline[4]}
    assert all(len(o[0][0]) == 9 for o in (offline[0], offline[3]))

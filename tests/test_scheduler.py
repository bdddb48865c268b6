"""Scheduler behaviour with a fake model (tokens appended by hand): token budget, chunked prefill,
FCFS, preemption under a tiny pool (delayed, never dropped), abort, and all blocks free at the end."""

from serve.block_manager import BlockManager
from serve.config import EngineConfig
from serve.sampling_params import SamplingParams
from serve.scheduler import Scheduler
from serve.sequence import Sequence

BS = 4


def make(num_blocks=64, budget=8, max_num_seqs=8):
    config = EngineConfig(model="unused", block_size=BS, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
    return Scheduler(config, BlockManager({None: num_blocks}, BS))


def add(scheduler, rid, length, max_tokens=4):
    s = Sequence(rid, list(range(1, length + 1)), SamplingParams(max_tokens=max_tokens))
    scheduler.add(s)
    return s


def run_step(scheduler):
    """One fake engine step; returns the batch. Sampling sequences get token 9 appended."""
    batch = scheduler.schedule()
    assert sum(batch.num_new_tokens) <= scheduler.config.max_num_batched_tokens
    sampled = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
    scheduler.advance(batch)
    for s in sampled:
        s.token_ids.append(9)
        if s.num_output_tokens >= s.params.max_tokens:
            scheduler.finish(s, "length")
    return batch


def test_chunked_prefill_respects_budget_and_mixes_with_decode():
    scheduler = make(budget=8)
    a, b = add(scheduler, "a", 3), add(scheduler, "b", 20)
    first = run_step(scheduler)
    assert first.num_new_tokens == [3, 5]                  # b's prompt is split
    second = run_step(scheduler)
    assert second.seqs == [a, b] and second.num_new_tokens == [1, 7]
    while scheduler.has_unfinished():
        run_step(scheduler)
    assert scheduler.block_manager.num_used_blocks() == 0


def test_fcfs_with_one_slot():
    scheduler = make(max_num_seqs=1)
    seqs = [add(scheduler, str(i), 5) for i in range(3)]
    finished = []
    while scheduler.has_unfinished():
        batch = run_step(scheduler)
        finished += [s.request_id for s in batch.seqs if s.is_finished]
    assert finished == ["0", "1", "2"] and all(s.is_finished for s in seqs)


def test_preemption_delays_but_never_drops():
    scheduler = make(num_blocks=6, budget=32)              # 24 token slots for 3 sequences of 6 + 6
    seqs = [add(scheduler, str(i), 6, max_tokens=6) for i in range(3)]
    steps = 0
    while scheduler.has_unfinished():
        run_step(scheduler)
        steps += 1
        assert steps < 200
    assert scheduler.num_preemptions > 0
    assert all(s.is_finished and s.num_output_tokens == 6 for s in seqs)
    assert scheduler.block_manager.num_used_blocks() == 0


def test_abort_waiting_and_running_frees_blocks():
    scheduler = make(budget=4)
    add(scheduler, "a", 10)
    add(scheduler, "b", 10)
    run_step(scheduler)
    assert [s.request_id for s in scheduler.abort("a")] == ["a"]
    assert [s.request_id for s in scheduler.abort("b")] == ["b"]
    assert not scheduler.has_unfinished() and scheduler.block_manager.num_used_blocks() == 0

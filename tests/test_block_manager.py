"""Block manager invariants without a model: reference counts, prefix-cache hits and eviction,
sliding-window freeing, copy-on-write after fork, and every block free at the end."""

from serve.block_manager import FREED, BlockManager, BlockPool
from serve.sampling_params import SamplingParams
from serve.sequence import Sequence

BS, WINDOW = 4, 8


def seq(tokens, n=1):
    return Sequence("r", list(tokens), SamplingParams(n=n))


def compute(bm, s, num_new):
    """What one engine step does for `s`: allocate (or append) slots, then commit the computed KV."""
    if not s.block_tables:
        cached = bm.find_cached_prefix(s)
        assert bm.can_allocate(s, cached, num_new)
        bm.allocate(s, cached, num_new)
    else:
        bm.append_slots(s, num_new)
    s.num_computed_tokens += num_new
    bm.commit(s)


def test_pool_evicts_least_recently_freed_cached_block():
    pool = BlockPool(3)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, 111)
    pool.register(b, 222)
    pool.release(b)
    pool.release(a)
    assert pool.num_free == 3 and pool.hash_to_block == {111: a, 222: b}
    pool.allocate()                      # the never-cached block goes first
    assert pool.allocate() == b and 222 not in pool.hash_to_block and 111 in pool.hash_to_block


def test_sliding_group_keeps_only_window_blocks_and_all_free_at_end():
    bm = BlockManager({None: 32, WINDOW: 32}, BS)
    s = seq(range(40))
    for chunk in (5, 3, 7, 1, 1, 9, 14):
        compute(bm, s, chunk)
        held = [b for b in s.block_tables[WINDOW] if b != FREED]
        assert len(held) <= (WINDOW - 1 + BS - 1) // BS + 1
        assert len(s.block_tables[None]) == -(-s.num_computed_tokens // BS)
    bm.free(s)
    assert bm.num_used_blocks() == 0


def test_prefix_hit_needs_window_blocks_and_leaves_a_token_to_compute():
    bm = BlockManager({None: 32, WINDOW: 32}, BS)
    first = seq(range(100, 113))              # 13 tokens: 3 full blocks
    compute(bm, first, 13)
    bm.free(first)
    second = seq(list(range(100, 112)) + [7, 8])
    assert bm.find_cached_prefix(second) == 3
    compute(bm, second, 2)
    assert second.block_tables[WINDOW][0] == FREED      # position 0..3 is outside every future window
    same = seq(range(100, 112))                          # exactly 3 blocks: the last token is recomputed
    assert bm.find_cached_prefix(same) == 2


def test_fork_shares_blocks_and_copies_on_write():
    bm = BlockManager({None: 16}, BS)
    parent = seq(range(6), n=2)
    compute(bm, parent, 6)                # block 0 full, block 1 holds 2 tokens
    child = parent.fork(1)
    bm.fork(parent, child)
    assert bm.pools[None].ref_counts[parent.block_tables[None][1]] == 2
    copies = bm.append_slots(child, 1)
    assert copies == [(None, parent.block_tables[None][1], child.block_tables[None][1])]
    assert bm.append_slots(parent, 1) == []              # the parent now owns its block alone
    assert child.block_tables[None][0] == parent.block_tables[None][0]
    bm.free(parent)
    bm.free(child)
    assert bm.num_used_blocks() == 0


def test_can_append_refuses_past_the_pool():
    bm = BlockManager({None: 2}, BS)
    s = seq(range(8))
    compute(bm, s, 8)
    assert not bm.can_append(s, 1)


def test_draft_groups_lag_and_trim_gives_back_rejected_slots():
    """A draft group ("draft", window) follows num_draft_computed: its window and the prefix cache wait
    for it; `trim` frees the blocks past the computed tokens (slots of rejected speculative tokens)."""
    draft_full, draft_window = ("draft", None), ("draft", WINDOW)
    bm = BlockManager({None: 32, WINDOW: 32, draft_full: 32, draft_window: 32}, BS)
    s = seq(range(100, 114))                          # 14 tokens
    compute(bm, s, 13)
    s.num_draft_computed = 7                          # the draft is behind: blocks 0-1 are full only in the target
    bm.commit(s)
    assert s.num_registered_blocks == 1
    assert s.block_tables[WINDOW][0] == FREED and s.block_tables[draft_window][0] != FREED
    s.num_draft_computed = 13
    bm.commit(s)
    assert s.num_registered_blocks == 3 and s.block_tables[draft_window][0] == FREED
    bm.append_slots(s, 1 + 5)                         # one decode token and five drafts: positions 13..18
    assert all(len(s.block_tables[key]) == 5 for key in bm.pools)
    s.num_computed_tokens = 15                        # one draft kept
    bm.trim(s)
    assert all(len(s.block_tables[key]) == 4 for key in bm.pools)
    bm.free(s)
    assert bm.num_used_blocks() == 0 and s.num_draft_computed == 0

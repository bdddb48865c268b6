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


DRAFT_FULL, DRAFT_WINDOW = ("draft", None), ("draft", WINDOW)


def with_draft(n=32):
    return BlockManager({None: n, WINDOW: n, DRAFT_FULL: n, DRAFT_WINDOW: n}, BS)


def catch_up(bm, s, num_new, num_drafts=0):
    """A speculative step for the draft: slots for its lag and its drafts, then the lag computed."""
    assert bm.can_append(s, num_new + num_drafts, draft=True)
    copies = bm.append_slots(s, num_new + num_drafts, draft=True)
    s.num_draft_computed += num_new
    bm.commit(s)
    return copies


def test_draft_groups_lag_and_allocate_only_when_they_catch_up():
    """The draft's groups take no block while it lags (prefill, steps that draft nothing); catching up
    allocates its whole lag at once, then its window frees as usual and `trim` gives back rejected slots."""
    bm = with_draft()
    s = seq(range(100, 130))
    compute(bm, s, 13)
    for _ in range(5):                                   # decode steps that draft nothing
        compute(bm, s, 1)
    assert s.num_computed_tokens == 18 and s.num_draft_computed == 0
    assert s.block_tables[DRAFT_FULL] == s.block_tables[DRAFT_WINDOW] == []
    assert bm.pools[DRAFT_FULL].num_used == bm.pools[DRAFT_WINDOW].num_used == 0
    assert s.num_registered_blocks == 4 and s.num_draft_registered_blocks == 0   # the target caches alone
    catch_up(bm, s, 18, num_drafts=2)                   # lag 18, then drafts at positions 18, 19
    assert len(s.block_tables[DRAFT_FULL]) == 5 and s.num_draft_registered_blocks == 4
    assert s.block_tables[DRAFT_WINDOW][:2] == [FREED, FREED]     # outside the window of position 17
    bm.append_slots(s, 1 + 3)                            # the target verifies [18, d_1..d_3]
    s.num_computed_tokens, s.num_draft_computed = 20, 19          # one draft kept
    bm.trim(s)
    assert len(s.block_tables[None]) == 5 and len(s.block_tables[DRAFT_FULL]) == 5
    bm.free(s)
    assert bm.num_used_blocks() == 0 and s.num_draft_computed == s.num_draft_registered_blocks == 0


def test_lagging_draft_caches_and_reuses_its_own_prefix():
    """Each side registers the blocks it has computed; a new sequence takes the target's hits and the
    draft's (fewer, as far as the draft had caught up)."""
    bm = with_draft()
    s = seq(range(100, 130))
    compute(bm, s, 20)
    catch_up(bm, s, 17)
    assert (s.num_registered_blocks, s.num_draft_registered_blocks) == (5, 4)
    other = seq(list(range(100, 124)) + [1])
    assert bm.find_cached_prefix(other) == 5
    bm.allocate(other, 5, 5)
    assert (other.num_computed_tokens, other.num_draft_computed) == (20, 16)
    assert other.block_tables[DRAFT_FULL] == s.block_tables[DRAFT_FULL][:4]
    assert other.block_tables[DRAFT_WINDOW][:2] == [FREED, FREED]
    for x in (s, other):
        bm.free(x)
    assert bm.num_used_blocks() == 0


def test_draft_pool_never_blocks_the_target_and_forks_copy_on_write():
    bm = BlockManager({None: 8, DRAFT_FULL: 3}, BS)
    s = seq(range(12))
    compute(bm, s, 12)
    assert bm.can_append(s, 4) and not bm.can_append(s, 16, draft=True)
    bm.free(s)
    parent = seq(range(6), n=2)
    compute(bm, parent, 6)
    catch_up(bm, parent, 6)                              # draft block 1 holds 2 tokens
    child = parent.fork(1)
    bm.fork(parent, child)
    copies = bm.append_slots(child, 1, draft=True)
    assert copies == [(DRAFT_FULL, parent.block_tables[DRAFT_FULL][1], child.block_tables[DRAFT_FULL][1])]
    for x in (parent, child):
        bm.free(x)
    assert bm.num_used_blocks() == 0

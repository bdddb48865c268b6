"""The tensor-parallel split (serve/distributed/split.py): every head, KV head, filter and vocabulary
row is placed, each rank's query heads read only its own KV heads at one ratio, rank 0 always has work."""

import pytest

from serve.distributed.split import even_ranges, split_heads, split_layer, vocab_chunk, vocab_range


def test_even_ranges_differ_by_at_most_one():
    assert [len(r) for r in even_ranges(7, 3)] == [3, 2, 2]
    assert [list(r) for r in even_ranges(2, 4)] == [[0], [1], [], []]
    assert even_ranges(0, 2) == [range(0), range(0)]


@pytest.mark.parametrize("heads,kv_heads,world", [(8, 4, 2), (8, 2, 4), (3, 1, 2), (6, 3, 2), (4, 1, 4),
                                                  (12, 4, 8), (2, 2, 4), (1, 1, 2), (5, 5, 2)])
def test_heads_are_each_placed_once_and_read_their_own_kv(heads, kv_heads, world):
    group = heads // kv_heads
    placed = []
    for rank in range(world):
        q, kv = split_heads(heads, kv_heads, world, rank)
        placed += q
        assert {h // group for h in q} == set(kv)                  # only the KV heads its queries read
        if q:
            assert len(q) % len(kv) == 0 and all(q[i] // group == kv[i // (len(q) // len(kv))] for i in range(len(q)))
    assert sorted(placed) == list(range(heads))
    assert split_heads(heads, kv_heads, world, 0)[0]                 # rank 0 holds every KV group in use


def test_kv_heads_fewer_than_ranks_are_replicated():
    assert [split_heads(4, 1, 2, r) for r in range(2)] == [([0, 1], [0]), ([2, 3], [0])]
    assert [split_heads(3, 1, 2, r) for r in range(2)] == [([0, 1], [0]), ([2], [0])]
    assert [split_heads(4, 2, 4, r)[1] for r in range(4)] == [[0], [0], [1], [1]]
    assert split_heads(1, 1, 2, 1) == ([], [])                       # nothing left for rank 1


def test_uneven_kv_groups_go_whole_to_ranks():
    assert [split_heads(6, 3, 2, r) for r in range(2)] == [([0, 1, 2, 3], [0, 1]), ([4, 5], [2])]


def test_empty_layers_cost_no_communication():
    shard = split_layer(0, 0, 0, 2, 1)
    assert (shard.heads, shard.kv_heads, len(shard.filters)) == ([], [], 0)
    assert not shard.attn_reduced and not shard.mlp_reduced
    partial = split_layer(1, 1, 1, 2, 1)              # rank 1 has nothing, rank 0 has it: still reduced
    assert partial.heads == [] and partial.attn_reduced and partial.mlp_reduced and len(partial.filters) == 0


def test_vocab_shards_are_padded_to_one_width():
    assert vocab_chunk(321, 2) == 161
    assert [vocab_range(321, 2, r) for r in range(2)] == [range(161), range(161, 321)]
    assert vocab_range(5, 4, 3) == range(5, 5)

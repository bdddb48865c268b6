"""Paged KV memory: fixed-size blocks, per-sequence block tables, sharing and freeing (PagedAttention).

KV groups: layers that share an attention span share block tables. Group key None is full (global)
attention; an int key is a sliding window of that many tokens (counting the current one, as in Hugging
Face). Every layer has its own cache tensor of its own KV width, so pruned layers pay only for their heads.
- Sliding groups free blocks wholly outside the window of every future query; their table entry
  becomes -1 (never read by the attention kernels).
- Prefix caching: a full block is hashed with its whole prefix (hash chain); a freed block keeps its hash
  and stays reusable until the pool evicts it (least recently freed first).
- Copy-on-write: `fork` shares every block; appending into a shared, partly filled block copies it first.
- Draft groups (speculative decoding): a key ("draft", window) holds a draft model's group. The draft is
  lazy: its KV lags the target's by any number of tokens (`seq.num_draft_computed`), and its blocks are
  allocated only when it catches up (`append_slots(..., draft=True)`, counted from its own computed
  tokens); scheduling, `can_append` and `can_allocate` see the target's groups alone, so a draft never
  causes a preemption. Every per-group rule follows that group's own computed count: copy-on-write,
  windows, `trim`, and the prefix cache (a draft group registers and reuses only blocks the draft has
  computed; `allocate` takes the draft's cached prefix up to the target's). `fork` and `free` cover both.
  `trim` gives back the blocks past the computed tokens (those of rejected speculative tokens).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from serve.sequence import Sequence

FREED = -1
DRAFT = "draft"


def window(key) -> int | None:
    """The attention span of a group key: None (full), a window, or a draft group's ("draft", window)."""
    return key[1] if isinstance(key, tuple) else key


def draft_key(key):
    return (DRAFT, key)


def is_draft(key) -> bool:
    return isinstance(key, tuple)


def num_computed(seq: Sequence, key) -> int:
    """Tokens whose KV the group `key` holds for `seq`."""
    return seq.num_draft_computed if is_draft(key) else seq.num_computed_tokens


class BlockPool:
    """Reference-counted blocks of one KV group, with the hash -> block map of cached full blocks."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()   # refcount 0 but still cached
        self.hash_to_block: dict[int, int] = {}
        self.block_to_hash: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.hash_to_block[self.block_to_hash.pop(block)]
        self.ref_counts[block] = 1
        return block

    def acquire(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.evictable[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self.block_to_hash:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def register(self, block: int, block_hash: int) -> None:
        if block_hash not in self.hash_to_block and block not in self.block_to_hash:
            self.hash_to_block[block_hash] = block
            self.block_to_hash[block] = block_hash


class BlockManager:
    def __init__(self, num_blocks: dict[int | None, int], block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pools = {key: BlockPool(n) for key, n in num_blocks.items()}
        self.enable_prefix_caching = enable_prefix_caching
        self.num_copies = 0       # copy-on-write block copies so far

    def _side(self, draft: bool) -> dict:
        """The pools of the target's groups, or of the draft's."""
        return {key: pool for key, pool in self.pools.items() if is_draft(key) == draft}

    # ---- sizing -------------------------------------------------------------------------------
    def _blocks_to_add(self, seq: Sequence, key, num_new: int) -> int:
        table = seq.block_tables.get(key, [])
        needed = -(-(num_computed(seq, key) + num_new) // self.block_size) - len(table)
        return max(needed, 0) + int(self._needs_copy(seq, key))

    def _needs_copy(self, seq: Sequence, key) -> bool:
        index, offset = divmod(num_computed(seq, key), self.block_size)
        table = seq.block_tables.get(key, [])
        return offset > 0 and index < len(table) and self.pools[key].ref_counts[table[index]] > 1

    def has_next_slot(self, seq: Sequence) -> bool:
        """Whether the target's next token slot is already allocated and unshared in every group: then a
        decode needs no block and no copy, which is most steps, and the scheduler can skip the full check."""
        index, offset = divmod(seq.num_computed_tokens, self.block_size)
        if offset == 0:
            return False
        for key, pool in self._side(False).items():
            table = seq.block_tables.get(key)
            if table is None or len(table) <= index or pool.ref_counts[table[index]] > 1:
                return False
        return True

    def reserve_next_slot(self, seq: Sequence) -> bool:
        """Allocate the next token's slot one step early (the overlapped decode loop): True when it is
        ready; False, changing nothing, when it needs a copy-on-write or more blocks than are free."""
        if self.has_next_slot(seq):
            return True
        if any(self._needs_copy(seq, key) for key in self._side(False)) or not self.can_append(seq, 1):
            return False
        self.append_slots(seq, 1)
        return True

    def can_append(self, seq: Sequence, num_new: int, draft: bool = False) -> bool:
        """Whether the target's groups (or the draft's) can take `num_new` tokens past their computed ones."""
        return all(self._blocks_to_add(seq, key, num_new) <= pool.num_free for key, pool in self._side(draft).items())

    def append_slots(self, seq: Sequence, num_new: int, draft: bool = False) -> list[tuple]:
        """Give `seq` blocks for `num_new` more tokens in the target's groups (or the draft's, past the
        draft's computed tokens); returns (group, src, dst) block copies to do first."""
        copies = []
        for key, pool in self._side(draft).items():
            table = seq.block_tables.setdefault(key, [])
            if self._needs_copy(seq, key):
                index = num_computed(seq, key) // self.block_size
                new_block = pool.allocate()
                copies.append((key, table[index], new_block))
                self.num_copies += 1
                pool.release(table[index])
                table[index] = new_block
                seq.block_table_version += 1
            while len(table) * self.block_size < num_computed(seq, key) + num_new:
                table.append(pool.allocate())
        return copies

    # ---- prefix caching -----------------------------------------------------------------------
    def _update_hashes(self, seq: Sequence, num_tokens: int) -> None:
        size = self.block_size
        while (len(seq.block_hashes) + 1) * size <= num_tokens:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else 0
            seq.block_hashes.append(hash((parent, tuple(seq.token_ids[i * size:(i + 1) * size]))))

    def _first_needed_block(self, key, num_computed: int) -> int:
        span = window(key)
        if span is None:
            return 0
        return max(0, num_computed - span + 1) // self.block_size

    def find_cached_prefix(self, seq: Sequence) -> int:
        """Number of leading full blocks whose KV every target group still holds (at least one token is
        left to compute)."""
        if not self.enable_prefix_caching:
            return 0
        self._update_hashes(seq, seq.num_tokens)
        return self._cached_count(seq, self._side(False), (seq.num_tokens - 1) // self.block_size)

    def _cached_count(self, seq: Sequence, pools: dict, max_count: int) -> int:
        for count in range(max_count, 0, -1):
            if all(self._holds(pool, key, seq.block_hashes, count) for key, pool in pools.items()):
                return count
        return 0

    def _holds(self, pool: BlockPool, key, hashes: list[int], count: int) -> bool:
        first = self._first_needed_block(key, count * self.block_size)
        return all(h in pool.hash_to_block for h in hashes[first:count])

    def can_allocate(self, seq: Sequence, num_cached_blocks: int, num_new: int) -> bool:
        """Whether the target's groups can take the cached prefix and `num_new` tokens after it (the draft
        takes only cached blocks now, which needs no free block)."""
        total = -(-(num_cached_blocks * self.block_size + num_new) // self.block_size)
        for key, pool in self._side(False).items():
            first = self._first_needed_block(key, num_cached_blocks * self.block_size)
            hits = [pool.hash_to_block[h] for h in seq.block_hashes[first:num_cached_blocks]]
            revived = sum(pool.ref_counts[b] == 0 for b in hits)
            if total - len(hits) - first + revived > pool.num_free:
                return False
        return True

    def allocate(self, seq: Sequence, num_cached_blocks: int, num_new: int) -> None:
        """Take the cached prefix blocks, then fresh blocks for `num_new` tokens after them; the draft's
        groups take the longest prefix they hold, up to the target's, and nothing else yet."""
        draft_pools = self._side(True)
        num_draft_cached = self._cached_count(seq, draft_pools, num_cached_blocks) if draft_pools else 0
        for key, pool in self.pools.items():
            count = num_draft_cached if is_draft(key) else num_cached_blocks
            first = self._first_needed_block(key, count * self.block_size)
            table = [FREED] * first
            for h in seq.block_hashes[first:count]:
                block = pool.hash_to_block[h]
                pool.acquire(block)
                table.append(block)
            seq.block_tables[key] = table
        seq.block_table_version += 1
        seq.num_computed_tokens = num_cached_blocks * self.block_size
        seq.num_draft_computed = num_draft_cached * self.block_size
        seq.num_registered_blocks, seq.num_draft_registered_blocks = num_cached_blocks, num_draft_cached
        self.append_slots(seq, num_new)

    # ---- after a step, fork, free -------------------------------------------------------------
    def commit(self, seq: Sequence) -> None:
        """Cache the newly completed blocks and free sliding-window blocks no future query can see."""
        if self.enable_prefix_caching:
            self._register(seq, draft=False)
            self._register(seq, draft=True)
        for key, pool in self.pools.items():
            if window(key) is not None:
                first = self._first_needed_block(key, num_computed(seq, key))
                self._free_out_of_window(seq.block_tables[key], pool, first)

    def _register(self, seq: Sequence, draft: bool) -> None:
        """Offer the blocks one side (target or draft) has newly filled to its pools' prefix cache."""
        pools = self._side(draft)
        if not pools:
            return
        done = seq.num_draft_registered_blocks if draft else seq.num_registered_blocks
        num_full = (seq.num_draft_computed if draft else seq.num_computed_tokens) // self.block_size
        if num_full <= done:
            return
        self._update_hashes(seq, num_full * self.block_size)
        for key, pool in pools.items():
            table = seq.block_tables[key]
            for i in range(done, num_full):
                if table[i] != FREED:
                    pool.register(table[i], seq.block_hashes[i])
        if draft:
            seq.num_draft_registered_blocks = num_full
        else:
            seq.num_registered_blocks = num_full

    @staticmethod
    def _free_out_of_window(table: list[int], pool: BlockPool, first_needed: int) -> None:
        # Freed entries always form a prefix of the table, so look back from the first needed block
        # only as far as the last freed one instead of rescanning the whole prefix every step.
        start = first_needed
        while start > 0 and table[start - 1] != FREED:
            start -= 1
        for i in range(start, first_needed):
            pool.release(table[i])
            table[i] = FREED

    def fork(self, parent: Sequence, child: Sequence) -> None:
        for key, pool in self.pools.items():
            child.block_tables[key] = list(parent.block_tables[key])
            for block in child.block_tables[key]:
                if block != FREED:
                    pool.acquire(block)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so eviction (oldest first) keeps the more shareable leading blocks longest.
        for key, pool in self.pools.items():
            for block in reversed(seq.block_tables.get(key, [])):
                if block != FREED:
                    pool.release(block)
        seq.block_tables = {}
        seq.block_table_version += 1
        seq.num_computed_tokens = seq.num_draft_computed = 0
        seq.num_registered_blocks = seq.num_draft_registered_blocks = 0

    def trim(self, seq: Sequence) -> None:
        """Give back each group's blocks past its computed tokens (slots of rejected speculative tokens):
        never hashed (not full of computed tokens) nor shared (appended fresh). The table's version moves:
        the entries appended next may hold other blocks at the same length (serve/cuda_graphs.py keeps a
        packed table until its sequence, version or length changes)."""
        for key, pool in self.pools.items():
            keep = -(-num_computed(seq, key) // self.block_size)
            table = seq.block_tables.get(key, [])
            if len(table) > keep:
                seq.block_table_version += 1
            while len(table) > keep:
                pool.release(table.pop())

    def num_used_blocks(self) -> int:
        return sum(pool.num_used for pool in self.pools.values())

    def num_total_blocks(self) -> int:
        return sum(pool.num_blocks for pool in self.pools.values())

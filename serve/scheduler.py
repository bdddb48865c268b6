"""Continuous batching: which sequences run this step, and how many tokens each computes.

Every step has a token budget (`max_num_batched_tokens`). Running sequences go first in arrival order
(one token for a decode, a chunk for an unfinished prefill), then waiting ones join in FCFS order while
budget, batch slots and blocks last. When blocks run out, the latest-arrived running sequence is
preempted: its blocks are freed and it returns to the front of the queue to be recomputed (its prefix
blocks often survive in the prefix cache). Nothing is ever dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serve.block_manager import BlockManager
from serve.config import EngineConfig
from serve.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    copies: list[tuple] = field(default_factory=list)   # (group key, src block, dst block)
    # Filled as sequences are added, so the runner and the engine need not rescan the batch.
    sampling: list[bool] = field(default_factory=list)  # sequence i reaches its last token this step
    num_sampling: int = 0
    max_num_new_tokens: int = 0

    def __len__(self) -> int:
        return len(self.seqs)

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token this step (so its logits are sampled)."""
        return self.sampling[i]

    @property
    def is_decode(self) -> bool:
        """Every sequence computes one token."""
        return self.max_num_new_tokens == 1

    @property
    def is_pure_decode(self) -> bool:
        """One token per sequence and every sequence samples (the fast path's decode graphs)."""
        return self.max_num_new_tokens == 1 and self.num_sampling == len(self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0      # prompt tokens served from the prefix cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        budget, preempted = self._schedule_running(batch, budget)
        if not preempted:
            self._schedule_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> tuple[int, bool]:
        queue, self.running, preempted = deque(self.running), [], False
        has_next_slot = self.block_manager.has_next_slot
        while queue and budget > 0:
            seq = queue.popleft()
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new == 1 and has_next_slot(seq):      # most decodes: no block to add or copy
                self._add_to_batch(batch, seq, 1)
                budget -= 1
                continue
            while not self.block_manager.can_append(seq, num_new):
                preempted = True
                if not queue:
                    self._preempt(seq)
                    break
                self._preempt(queue.pop())
            else:
                batch.copies += self.block_manager.append_slots(seq, num_new)
                self._add_to_batch(batch, seq, num_new)
                budget -= num_new
        self.running += queue
        return budget, preempted

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            slots = 1 if seq.forked else seq.params.n
            if len(self.running) + slots > self.config.max_num_seqs:
                break
            cached = self.block_manager.find_cached_prefix(seq)
            num_new = min(seq.num_tokens - cached * self.block_manager.block_size, budget)
            if not self.block_manager.can_allocate(seq, cached, num_new):
                break
            self.block_manager.allocate(seq, cached, num_new)
            self.num_cached_tokens += seq.num_computed_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self._add_to_batch(batch, seq, num_new)
            budget -= num_new

    def _add_to_batch(self, batch: ScheduledBatch, seq: Sequence, num_new: int) -> None:
        batch.seqs.append(seq)
        batch.num_new_tokens.append(num_new)
        sampling = seq.num_computed_tokens + num_new == seq.num_tokens
        batch.sampling.append(sampling)
        batch.num_sampling += sampling
        batch.max_num_new_tokens = max(batch.max_num_new_tokens, num_new)
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- after the model ran ------------------------------------------------------------------
    def advance(self, batch: ScheduledBatch) -> None:
        """Record the KV the step computed (prefix-cache the full blocks, free out-of-window ones)."""
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
            self.block_manager.commit(seq)

    def advance_decodes(self, seqs: list[Sequence]) -> None:
        """`advance` for a decode step launched ahead, once its input tokens are on the host (the
        prefix-cache hashes need them); sequences that finished meanwhile are left alone."""
        for seq in seqs:
            if seq.status is SequenceStatus.RUNNING:
                seq.num_computed_tokens += 1
                self.block_manager.commit(seq)

    def fork(self, parent: Sequence) -> list[Sequence]:
        """Split a request with n > 1 into its n sequences once the prompt is computed."""
        children = [parent.fork(i) for i in range(1, parent.params.n)]
        for child in children:
            self.block_manager.fork(parent, child)
        index = self.running.index(parent) + 1
        self.running[index:index] = children
        parent.forked = True
        return children

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        seqs = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        for seq in seqs:
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.finish(seq, "abort")
        return seqs

"""Overlapped decode: launch decode step N+1 on the device before the host reads step N's tokens.

Why: reading a step's sampled tokens is its one host sync, and the synchronous loop does all of the
next step's host work (schedule, pack, launch) and this step's post-processing (append tokens, check
stops) after it, while the GPU waits. Here, when step N is a pure decode batch on the fast path, step
N+1 is launched from what the host already knows: the same sequences (less those certain to stop on
length at N), one position further, with step N's sampled tokens gathered into N+1's input ids on the
device (serve/cuda_graphs.py). Step N's tokens are copied into pinned memory right behind step N and
marked by an event, so the host waits for N alone while N+1 runs; then it appends them and checks
stops. A sequence that stopped at step N had one more token computed in N+1: it is discarded.

Why the discarded token's KV write is harmless: it lands at the stopped sequence's first uncomputed
position, in a block that is neither prefix-cached (only blocks whose every token is computed get a
hash) nor shared (reserve_next_slot refuses copy-on-write). The host frees that block only after N+1
is queued, and every later step that may take the block is queued behind N+1 on the same stream, so
its own writes come later, and a step never reads a position it has not written.

The step ahead is taken only where it cannot change what the synchronous loop computes: every running
sequence is in the batch; sampling needs nothing from the host (no logprobs, seeded generators or stop
strings; n > 1 forks happen in synchronous steps); no waiting request has a free seat (admission is at
most one step late); every next slot can be allocated without a copy or a preemption. Otherwise the
engine reads the step in flight and goes back to the synchronous loop (serve/engine.py).
"""

from __future__ import annotations

import torch

from serve.sampler import sample_tokens
from serve.scheduler import ScheduledBatch
from serve.sequence import Sequence, SequenceStatus

RUNNING = SequenceStatus.RUNNING


class InFlight:
    """A launched decode step: row i decodes seqs[i]; its sampled tokens are on the device (`tokens`)
    and, once the `ready` event has fired, in the pinned `host` buffer (CPU: no buffer, no event)."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor, host: torch.Tensor | None, ready):
        self.seqs, self.tokens, self.host, self.ready = seqs, tokens, host, ready

    def read(self) -> list[int]:
        """The sampled tokens, waiting for this step only (not for a step launched after it)."""
        if self.ready is None:
            return self.tokens.tolist()
        self.ready.synchronize()
        return self.host[:len(self.seqs)].tolist()


class Lookahead:
    """The engine's step in flight (`pending`) and the rules for launching the one after it."""

    def __init__(self, config, runner, scheduler):
        self.config, self.runner, self.scheduler = config, runner, scheduler
        graphs = runner.decode_graphs
        self.enabled = bool(config.overlap) and graphs is not None
        self.pending: InFlight | None = None     # launched and advanced, tokens not yet read
        self.num_ahead = 0                       # steps launched before the previous one was read
        self.num_discarded = 0                   # tokens computed for sequences already stopped
        # Two (pinned buffer, event) pairs, alternating: step N+1's copy must not land in the buffer
        # step N's tokens are still to be read from.
        self._buffers = None
        if self.enabled and runner.device.type == "cuda":
            self._buffers = [(torch.zeros(graphs.max_batch, dtype=torch.int64, pin_memory=True),
                              torch.cuda.Event()) for _ in range(2)]
        self._flip = 0

    def can_defer(self, batch: ScheduledBatch) -> bool:
        """Whether a scheduled batch may run without its tokens being read at once."""
        return (self.enabled and batch.is_pure_decode and len(batch) <= self.runner.decode_graphs.max_batch
                and len(batch) == len(self.scheduler.running)
                and all(seq.forked and seq.can_overlap for seq in batch.seqs))

    @torch.inference_mode()
    def start(self, batch: ScheduledBatch) -> None:
        """Launch a scheduled pure decode batch and record its KV; its tokens are read later."""
        logits = self.runner.run(batch)
        self.scheduler.advance(batch)
        self.pending = self._in_flight(batch.seqs, logits)

    @torch.inference_mode()
    def launch_next(self) -> InFlight | None:
        """Launch the step after the pending one, or None where the synchronous loop must decide.
        The step returned is not advanced yet: its KV is recorded by `commit`, once the tokens it
        decodes are on the host."""
        current = self.pending
        rows = [row for row, seq in enumerate(current.seqs)
                if seq.status is RUNNING and seq.num_tokens + 1 < seq.max_num_tokens]
        seqs = [current.seqs[row] for row in rows]
        if not seqs or self._admission_due(len(seqs)) or not self._reserve(seqs):
            return None
        logits = self.runner.run_ahead(seqs, current.tokens, rows)
        self.num_ahead += 1
        return self._in_flight(seqs, logits)

    def commit(self, step: InFlight | None) -> InFlight | None:
        """After the previous step's tokens were appended: record `step`'s KV for the sequences still
        running; returns the step to keep pending (None when every sequence in it has stopped)."""
        if step is None:
            return None
        self.scheduler.advance_decodes(step.seqs)
        return step if any(seq.status is RUNNING for seq in step.seqs) else None

    def _admission_due(self, num_continuing: int) -> bool:
        """A waiting request has a seat: the synchronous scheduler would admit it next step."""
        waiting = self.scheduler.waiting
        if not waiting:
            return False
        head = waiting[0]
        return num_continuing + (1 if head.forked else head.params.n) <= self.config.max_num_seqs

    def _reserve(self, seqs: list[Sequence]) -> bool:
        # Stopping at the first refusal leaves earlier reservations in place: those slots are the ones
        # the synchronous scheduler allocates next anyway (or are freed with a sequence that stopped).
        reserve = self.scheduler.block_manager.reserve_next_slot
        return all(reserve(seq) for seq in seqs)

    def _in_flight(self, seqs: list[Sequence], logits: torch.Tensor) -> InFlight:
        # both launches of this class run through the decode graphs, which leave the argmax behind
        tokens = sample_tokens(logits, seqs, argmax=self.runner.decode_graphs.argmax)
        if self._buffers is None:
            return InFlight(seqs, tokens, None, None)
        host, ready = self._buffers[self._flip]
        self._flip ^= 1
        host[:len(seqs)].copy_(tokens, non_blocking=True)
        ready.record()
        return InFlight(seqs, tokens, host, ready)

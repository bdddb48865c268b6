"""One generated sequence: its tokens, how many of them have KV in the cache, and its block tables.

A request with `n` samples starts as one sequence; when its prompt is computed it is forked into `n`
sequences that share the prompt's KV blocks (copy-on-write, see block_manager.py). Block tables are one
list per KV group (full attention, or a sliding window); -1 marks a sliding-window block already freed.
"""

from __future__ import annotations

import itertools
from enum import Enum, auto

from serve.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sample_index: int = 0):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.sample_index = sample_index    # which of the request's n samples this is
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0        # tokens whose KV is in the cache
        self.num_draft_computed = 0         # the same in the draft's cache (speculative decoding; it may lag)
        self.acceptance = None              # the draft's acceptance estimate for this sequence (goodput.py)
        self.block_tables: dict[int | None, list[int]] = {}   # KV group key -> physical blocks
        self.block_hashes: list[int] = []   # hash chain of the full blocks seen so far
        self.num_registered_blocks = 0      # leading blocks already offered to the prefix cache
        self.num_draft_registered_blocks = 0    # the same in the draft's groups (speculative decoding)
        self.block_table_version = 0        # bumped when a table entry is replaced or dropped, not just appended
        self.forked = params.n == 1         # a parent with n > 1 forks once its prompt is done
        self.finish_reason: str | None = None
        self.logprobs: list[dict] = []
        self.num_preemptions = 0
        self.detokenizer = None             # set by the engine, with the two below
        self.stop_token_set: set[int] = set()   # EOS (unless ignore_eos) and stop_token_ids
        self.max_num_tokens = 0             # prompt + max_tokens, capped at the model's context
        self.can_overlap = False            # sampling needs nothing of the host (serve/lookahead.py)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def fork(self, sample_index: int) -> "Sequence":
        """A sibling with the same tokens and computed state; the block manager shares its blocks."""
        child = Sequence(self.request_id, self.token_ids[:self.num_prompt_tokens], self.params, sample_index)
        child.token_ids = list(self.token_ids)
        child.num_computed_tokens = self.num_computed_tokens
        child.num_draft_computed = self.num_draft_computed
        child.block_hashes = list(self.block_hashes)
        child.num_registered_blocks = self.num_registered_blocks
        child.num_draft_registered_blocks = self.num_draft_registered_blocks
        child.status = self.status
        child.forked = True
        return child

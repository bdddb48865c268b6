"""Speculative decoding: a draft model (typically the target's slimmed child from `compress prune`)
proposes tokens that the target verifies several at a time, with exact rejection sampling.

speculator.py runs a step (draft passes, one verify forward, acceptance, rollback); rejection.py is the
acceptance rule over plain tensors; goodput.py chooses the speculation length; proposer.py loads and
checks the draft; profile.py times forwards for goodput.py at start-up; graph_passes.py runs the draft
and verify passes of small pure decode steps on CUDA graphs.
"""

from serve.speculative.proposer import DraftRunner, make_runners
from serve.speculative.speculator import Draft, SpecStats, Speculator

__all__ = ["Draft", "DraftRunner", "SpecStats", "Speculator", "make_runners"]

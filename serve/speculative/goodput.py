"""Goodput control of the speculation length (after TurboSpec: Liu et al., 2024). No model here.

Each step picks one length k in 0..k_max for the whole batch (one verify forward serves every
sequence, so a per-batch k keeps the step's shape simple; a sequence near its max_tokens gets less)
that maximises expected generated tokens per second of step time:

    goodput(k) = sum_i E_i(min(k, cap_i)) / (t_draft(catch-up) + sum_{j=2..k} t_draft(b_j) + t_verify(n_k))

- E(a, k) = (1 - a^(k+1)) / (1 - a): expected tokens a sequence emits when each drafted token is kept
  with probability a (its accepted prefix plus the target's token). `Acceptance` estimates a per
  sequence: decayed counts of kept tokens over trials (a rejection ends the trials of a step), with a
  prior so a fresh sequence starts at PRIOR_ACCEPTANCE.
- `BatchTimeModel`: seconds of one forward against the tokens it computes, piecewise linear between
  measured points (start-up profile, serve/speculative/profile.py), refreshed by every observed step.
  Small batches are launch-bound (flat: a longer verify is nearly free, k > 0 wins); large ones are
  compute-bound (time grows with tokens: E(a, k) / (k + 1) < 1 makes k = 0 win on its own).
- The draft's catch-up pass (its KV kept in step with the target's) runs whatever k is, so it is a cost
  of every choice; t_verify counts the batch's other tokens (prefill chunks) too. A pure decode step
  that drafts nothing is the target's own decode step (CUDA graphs on the GPU), timed by its own model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

PRIOR_ACCEPTANCE = 0.6
PRIOR_WEIGHT = 2.0          # trials the prior counts for
DECAY = 0.9                 # per update: recent steps weigh more (acceptance drifts along a text)


@dataclass
class Acceptance:
    kept: float = 0.0
    trials: float = 0.0

    def update(self, accepted: int, proposed: int) -> None:
        """After a step that proposed `proposed` tokens and kept the first `accepted`."""
        if proposed == 0:
            return
        self.kept = DECAY * self.kept + accepted
        self.trials = DECAY * self.trials + accepted + (accepted < proposed)

    @property
    def rate(self) -> float:
        return (self.kept + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (self.trials + PRIOR_WEIGHT)


def expected_tokens(a: float, k: int) -> float:
    """E[kept + 1] for k drafted tokens each kept with probability a."""
    if a >= 1.0:
        return k + 1.0
    return (1.0 - a ** (k + 1)) / (1.0 - a)


class BatchTimeModel:
    """Seconds of one forward of a model against the tokens it computes (the sequence count matters
    much less once the tokens are known, and the steps here keep both in proportion)."""

    def __init__(self, points: dict[int, float] | None = None, weight: float = 0.2):
        self.points = dict(points or {})        # num_tokens -> seconds
        self.weight = weight                    # of a new observation in its bucket

    def observe(self, num_tokens: int, seconds: float) -> None:
        """Blend a measured forward into the point of its power-of-two bucket."""
        bucket = 1 << max(0, num_tokens - 1).bit_length()
        old = self.points.get(bucket)
        self.points[bucket] = seconds if old is None else (1 - self.weight) * old + self.weight * seconds

    def predict(self, num_tokens: int) -> float:
        if num_tokens <= 0 or not self.points:
            return 0.0
        xs = sorted(self.points)
        if num_tokens <= xs[0]:
            return self.points[xs[0]]
        for lo, hi in itertools.pairwise(xs):
            if num_tokens <= hi:
                return self._line(lo, hi, num_tokens)
        if len(xs) == 1:
            return self.points[xs[0]] * num_tokens / xs[0]
        return max(self._line(xs[-2], xs[-1], num_tokens), self.points[xs[-1]])

    def _line(self, lo: int, hi: int, x: int) -> float:
        y0, y1 = self.points[lo], self.points[hi]
        return y0 + (y1 - y0) * (x - lo) / (hi - lo)


@dataclass
class StepShape:
    """What a step computes besides the drafts: the draft's catch-up tokens, the target's other tokens
    (prefill chunks and non-speculating decodes) and the tokens those sample."""
    catch_up_tokens: int
    other_tokens: int
    other_samples: int


def step_goodput(k: int, rates: list[float], caps: list[int], shape: StepShape,
                 draft: BatchTimeModel, target: BatchTimeModel, decode: BatchTimeModel | None = None) -> float:
    """Expected tokens per second of a step drafting min(k, cap_i) tokens for sequence i. `decode`: the
    target's own decode step, the cost of k = 0 where the batch is pure decode (its CUDA graphs)."""
    lengths = [min(k, cap) for cap in caps]
    tokens = shape.other_samples + sum(expected_tokens(a, n) for a, n in zip(rates, lengths))
    seconds = draft.predict(shape.catch_up_tokens)
    seconds += sum(draft.predict(sum(n >= j for n in lengths)) for j in range(2, k + 1))
    verify = decode if k == 0 and decode is not None and decode.points else target
    seconds += verify.predict(shape.other_tokens + sum(n + 1 for n in lengths))
    return tokens / seconds if seconds > 0 else 0.0


def choose_length(rates: list[float], caps: list[int], k_max: int, shape: StepShape,
                  draft: BatchTimeModel, target: BatchTimeModel, decode: BatchTimeModel | None = None) -> int:
    """The k in 0..k_max of the highest goodput (the shortest of equals)."""
    best, best_goodput = 0, step_goodput(0, rates, caps, shape, draft, target, decode)
    for k in range(1, k_max + 1):
        goodput = step_goodput(k, rates, caps, shape, draft, target, decode)
        if goodput > best_goodput * (1 + 1e-9):
            best, best_goodput = k, goodput
    return best

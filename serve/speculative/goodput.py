"""Goodput control of the speculation length (after TurboSpec: Liu et al., 2024). No model here.

Each step picks one length k in 0..k_max for the whole batch (one verify forward serves every
sequence, so a per-batch k keeps the step's shape simple; a sequence near its max_tokens gets less)
that maximises expected generated tokens per second of step time:

    goodput(k) = sum_i E_i(min(k, cap_i)) / (t_draft(catch-up_k) + sum_{j=2..k} t_draft(b_j) + t_verify(n_k))

- E(a, k) = (1 - a^(k+1)) / (1 - a): expected tokens a sequence emits when each drafted token is kept
  with probability a (its accepted prefix plus the target's token). `Acceptance` estimates a per
  sequence: decayed counts of kept tokens over trials (a rejection ends the trials of a step), with a
  prior so a fresh sequence starts at PRIOR_ACCEPTANCE.
- `BatchTimeModel`: seconds of one forward against the tokens it computes, piecewise linear between
  measured points (start-up profile, serve/speculative/profile.py), refreshed by every observed step.
  Small batches are launch-bound (flat: a longer verify is nearly free, k > 0 wins); large ones are
  compute-bound (time grows with tokens: E(a, k) / (k + 1) < 1 makes k = 0 win on its own).
- The draft is lazy (speculator.py): it runs only in steps that draft, and first catches up on the
  tokens it skipped (its lag: 1 for a sequence that drafted the step before, more after a stretch of
  k = 0 or a prompt). So k = 0 costs the draft nothing, and k > 0 pays the catch-up. The catch-up is a
  debt paid once that serves the rest of the sequence, so a step charges each drafting sequence its own
  token plus the rest of its lag spread over the speculative steps it has left:

      catch-up_k = sum_{i: min(k, cap_i) > 0} 1 + (lag_i - 1) / max(1, remaining_i / E_i(min(k, cap_i)))

  (remaining_i: the tokens it may still generate by max_tokens; a stop may come sooner). Charged in
  full, a long lag would make k = 0 win for ever once chosen (the lag grows every step it wins);
  ignored, a step would start a catch-up that its few remaining tokens cannot repay. Amortized, a
  stretch of k = 0 raises the charge by only about E_i / remaining_i per step, so the choice moves
  smoothly with load instead of flipping back and forth.
- t_verify counts the batch's other tokens (prefill chunks) too. A pure decode step that drafts nothing
  is the target's own decode step (CUDA graphs on the GPU), timed by its own model. A step whose passes
  run on CUDA graphs (speculator.py) is costed with the timings of those graphs (the draft's decode
  step, the target's verify step), the others with those of eager forwards.
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
    """What a step computes besides the drafts: the target's other tokens (prefill chunks and
    non-speculating decodes) and the tokens those sample; per sequence that may speculate, the tokens
    its draft has not computed (`lags`, counting the one scheduled now) and the tokens it may still
    generate (`remaining`)."""
    other_tokens: int
    other_samples: int
    lags: list[int]
    remaining: list[int]


def catch_up_tokens(rates: list[float], lengths: list[int], shape: StepShape) -> float:
    """Draft tokens a step charges for catching up (the module docstring's amortized rule)."""
    total = 0.0
    for a, n, lag, left in zip(rates, lengths, shape.lags, shape.remaining):
        if n > 0:
            steps = max(1.0, left / expected_tokens(a, n))      # speculative steps the catch-up serves
            total += 1 + (lag - 1) / steps
    return total


def step_goodput(k: int, rates: list[float], caps: list[int], shape: StepShape,
                 draft: BatchTimeModel, target: BatchTimeModel, decode: BatchTimeModel | None = None) -> float:
    """Expected tokens per second of a step drafting min(k, cap_i) tokens for sequence i. `decode`: the
    target's own decode step, the cost of k = 0 where the batch is pure decode (its CUDA graphs)."""
    lengths = [min(k, cap) for cap in caps]
    tokens = shape.other_samples + sum(expected_tokens(a, n) for a, n in zip(rates, lengths))
    seconds = draft.predict(catch_up_tokens(rates, lengths, shape))
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

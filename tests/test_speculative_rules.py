"""The pure parts of speculative decoding, no model: the acceptance rule (serve/speculative/rejection.py)
and the goodput choice of the speculation length (serve/speculative/goodput.py).

The sampled rule is checked statistically: on a 6-token vocabulary, 20,000 draws of the first emitted
token, each from a fresh (draft, target) draw, must match the target's distribution within a total
variation of 0.02 (the sampling noise of 20,000 draws over 6 outcomes is about 0.01); the seed is fixed.
"""

import pytest
import torch

from serve.sampler import filtered_probs
from serve.sampling_params import SamplingParams
from serve.speculative.goodput import (
    Acceptance,
    BatchTimeModel,
    StepShape,
    catch_up_tokens,
    choose_length,
    expected_tokens,
    step_goodput,
)
from serve.speculative.rejection import draw, greedy_accept, rejection_sample

VOCAB = 6
NUM_DRAWS = 20_000
TOLERANCE = 0.02


def test_greedy_accept_keeps_the_matching_prefix_then_the_targets_token():
    assert greedy_accept([4, 2, 7], [4, 2, 7, 9]) == [4, 2, 7, 9]      # all kept, bonus
    assert greedy_accept([4, 5, 7], [4, 2, 7, 9]) == [4, 2]            # second rejected, target's instead
    assert greedy_accept([1], [3, 8]) == [3]
    assert greedy_accept([], [6]) == [6]


def first_token_distribution(draft_probs, target_probs, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB)
    for _ in range(NUM_DRAWS):
        tokens = draw(draft_probs[:k], generator)
        uniform = torch.rand(k, generator=generator)
        noise = torch.empty(VOCAB).exponential_(generator=generator)
        counts[rejection_sample(tokens, draft_probs[:k], target_probs[:k + 1], uniform, noise)[0]] += 1
    return counts / NUM_DRAWS


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4),
                                    SamplingParams(temperature=1.3, top_p=0.8)], ids=["plain", "top_k", "top_p"])
def test_rejection_sampling_matches_the_target_distribution(k, params):
    g = torch.Generator().manual_seed(1)
    target_logits, draft_logits = torch.randn(4, VOCAB, generator=g) * 1.5, torch.randn(4, VOCAB, generator=g) * 1.5
    target = filtered_probs(target_logits, [params] * 4)
    draft = filtered_probs(draft_logits, [params] * 4)
    observed = first_token_distribution(draft, target, k)
    assert 0.5 * (observed - target[0]).abs().sum() < TOLERANCE
    assert 0.5 * (draft[0] - target[0]).abs().sum() > 5 * TOLERANCE      # the draft alone would fail


def test_a_perfect_draft_is_always_accepted():
    probs = torch.softmax(torch.randn(3, VOCAB), dim=1)
    tokens = torch.tensor([1, 2])
    out = rejection_sample(tokens, probs[:2], probs, torch.full((2,), 0.999), torch.ones(VOCAB))
    assert out[:2] == [1, 2] and len(out) == 3


def test_expected_tokens_and_acceptance_estimate():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 3) == 4.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    estimate = Acceptance()
    assert 0.5 < estimate.rate < 0.7
    for _ in range(20):
        estimate.update(0, 3)
    assert estimate.rate < 0.15        # decayed counts: the prior keeps a floor
    for _ in range(30):
        estimate.update(3, 3)
    assert estimate.rate > 0.9


def test_time_model_interpolates_and_learns():
    model = BatchTimeModel({1: 1.0, 16: 1.0, 256: 4.0})
    assert model.predict(8) == 1.0 and model.predict(136) == pytest.approx(2.5)
    assert model.predict(512) == pytest.approx(4.0 + 3.0 * 256 / 240)
    for _ in range(50):
        model.observe(200, 8.0)
    assert model.predict(256) > 7.5


def launch_bound() -> BatchTimeModel:
    """A small model on a big GPU: flat until thousands of tokens."""
    return BatchTimeModel({1: 0.010, 64: 0.010, 1024: 0.012, 4096: 0.040})


def compute_bound() -> BatchTimeModel:
    """Time grows with every token past a few."""
    return BatchTimeModel({1: 0.010, 16: 0.012, 256: 0.150, 4096: 2.4})


def test_small_launch_bound_batch_speculates():
    shape = StepShape(other_tokens=0, other_samples=0, lags=[1], remaining=[100])
    k = choose_length([0.8], [8], 8, shape, BatchTimeModel({1: 0.002, 64: 0.002}), launch_bound())
    assert k >= 3


def test_large_compute_bound_batch_does_not_speculate():
    shape = StepShape(other_tokens=0, other_samples=0, lags=[1] * 256, remaining=[100] * 256)
    draft = BatchTimeModel({1: 0.001, 256: 0.010, 4096: 0.16})
    assert choose_length([0.8] * 256, [8] * 256, 8, shape, draft, compute_bound()) == 0


def test_low_acceptance_does_not_speculate_and_caps_limit_lengths():
    shape = StepShape(other_tokens=0, other_samples=0, lags=[1], remaining=[100])
    draft = BatchTimeModel({1: 0.005})
    # a draft pass costs half a verify: at this acceptance no length repays it
    assert choose_length([0.02], [8], 8, shape, draft, launch_bound()) == 0
    assert choose_length([0.9], [2], 8, shape, BatchTimeModel({1: 0.0001}), launch_bound()) == 2


def test_a_cheaper_decode_step_counts_for_k_zero():
    """The target's own decode step (CUDA graphs) can beat an eager verify that drafting needs."""
    shape = StepShape(other_tokens=0, other_samples=0, lags=[1] * 32, remaining=[100] * 32)
    draft, eager = BatchTimeModel({1: 0.002, 1024: 0.002}), BatchTimeModel({1: 0.020, 1024: 0.020})
    rates, caps = [0.5] * 32, [8] * 32
    assert choose_length(rates, caps, 8, shape, draft, eager) > 0
    assert choose_length(rates, caps, 8, shape, draft, eager, BatchTimeModel({1: 0.008, 256: 0.008})) == 0


def test_catch_up_is_charged_to_drafting_lengths_only_and_amortized():
    """After a stretch of k = 0 the draft lags: k > 0 pays its catch-up, spread over the steps it serves.
    A short remainder cannot repay a long lag; a long one can; a step of k = 0 charges nothing."""
    draft, target = BatchTimeModel({1: 0.002, 64: 0.002, 4096: 0.060}), launch_bound()
    rates, caps = [0.8], [4]

    def shape(lag, remaining):
        return StepShape(other_tokens=0, other_samples=0, lags=[lag], remaining=[remaining])

    assert catch_up_tokens(rates, [0], shape(4000, 500)) == 0
    assert catch_up_tokens(rates, [4], shape(1, 500)) == 1
    assert catch_up_tokens(rates, [4], shape(4000, 3)) == 4000            # one step left: the whole lag
    assert catch_up_tokens(rates, [4], shape(4000, 3000)) == pytest.approx(1 + 3999 * expected_tokens(0.8, 4) / 3000)
    assert choose_length(rates, caps, 4, shape(4000, 3), draft, target) == 0
    assert choose_length(rates, caps, 4, shape(4000, 3000), draft, target) > 0
    # the charge grows smoothly with the lag: no cliff between one step of k = 0 and the next
    charges = [step_goodput(4, rates, caps, shape(lag, 3000), draft, target) for lag in range(1, 200)]
    assert all(0 <= a - b < 0.01 * a for a, b in zip(charges, charges[1:]))

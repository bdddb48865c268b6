"""Exact acceptance of drafted tokens (speculative sampling: Leviathan et al., 2023; Chen et al., 2023).

Pure functions of tensors, no model. A draft proposed k tokens d_1..d_k from its distributions
q_1..q_k; the target scored the same positions plus one more, p_1..p_{k+1}.
- Greedy: d_j is kept while it equals argmax p_j; the first mismatch is replaced by argmax p_j; when all
  k are kept, argmax p_{k+1} is the bonus token. The output is the target's greedy output, token for token.
- Sampled: d_j is kept with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection the next
  token is drawn from norm(max(0, p_j - q_j)); when all are kept, the bonus token is drawn from p_{k+1}.
  Every emitted token is then distributed as the target's own next token. p and q are the sampling
  distributions after temperature, top-k and top-p (serve/sampler.py `filtered_probs`), the same
  transform on both sides.
Randomness comes in as arguments (`uniform [k]` in [0, 1), `noise [V]` ~ Exp(1): a draw from weights w
is argmax(w / noise)), so a seeded request draws from its own generator and tests fix every draw.
"""

from __future__ import annotations

import torch


def greedy_accept(draft_tokens: list[int], target_argmax: list[int]) -> list[int]:
    """Tokens to append (1..k+1): the draft's while they match the target's argmax [k+1], then the target's."""
    out = []
    for drafted, wanted in zip(draft_tokens, target_argmax):
        if drafted != wanted:
            break
        out.append(drafted)
    out.append(target_argmax[len(out)])
    return out


def num_accepted(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                 uniform: torch.Tensor) -> int:
    """Leading draft tokens kept: d_j while uniform_j * q_j(d_j) < p_j(d_j).
    draft_tokens [k] int64, draft_probs [k, V], target_probs [k+1, V] (or [k, V]), uniform [k]."""
    rows = torch.arange(draft_tokens.shape[0], device=draft_tokens.device)
    p = target_probs[rows, draft_tokens]
    q = draft_probs[rows, draft_tokens]
    keep = (uniform * q < p).to(torch.int64)
    return int(keep.cumprod(0).sum())


def next_token_weights(draft_probs: torch.Tensor, target_probs: torch.Tensor, accepted: int) -> torch.Tensor:
    """[V] weights of the token after `accepted` kept ones: max(0, p - q) at a rejection, p after all k."""
    if accepted == draft_probs.shape[0]:
        return target_probs[accepted]
    residual = (target_probs[accepted] - draft_probs[accepted]).clamp_min(0)
    # p == q leaves nothing; a rejection is then impossible in exact arithmetic, and p is the right draw
    return residual if bool(residual.sum() > 0) else target_probs[accepted]


def rejection_sample(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                     uniform: torch.Tensor, noise: torch.Tensor) -> list[int]:
    """Tokens to append (1..k+1) for sampled rows. Shapes: draft_tokens [k], draft_probs [k, V],
    target_probs [k+1, V], uniform [k], noise [V]."""
    accepted = num_accepted(draft_tokens, draft_probs, target_probs, uniform)
    weights = next_token_weights(draft_probs, target_probs, accepted)
    return draft_tokens[:accepted].tolist() + [int((weights / noise).argmax())]


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [N, V] (the exponential race, as serve/sampler.py draws)."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)

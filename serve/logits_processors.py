"""Logits processors of the sampling fields: logit_bias, min_tokens and the three penalties.

`process(logits, seqs)` takes the batch's fp32 logits [N, V] and returns them adjusted, vectorised
over the rows on the logits' device; a batch in which no row asks returns the same tensor untouched
(one Python `any` per step), so the fast path pays nothing. Rows that ask need their token history on
the host, which is why they never take the overlapped decode loop (serve/lookahead.py) and why the
sampler recomputes the argmax of processed logits instead of taking the decode graph's (serve/sampler.py).

Definitions, applied in this order (vLLM's):
- min_tokens: EOS and stop_token_ids are -inf until min_tokens tokens have been generated.
- logit_bias: logit[t] += bias[t] (OpenAI).
- repetition_penalty p (CTRL; Hugging Face's RepetitionPenaltyLogitsProcessor): every token in the
  prompt or the output so far has its logit divided by p where positive, multiplied by p where negative.
- presence_penalty a, frequency_penalty f (OpenAI): logit[t] -= a * (c[t] > 0) + f * c[t], where c[t]
  counts t in the generated tokens only (as vLLM; the prompt does not count).
"""

from __future__ import annotations

import torch

from serve.sequence import Sequence


def process(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [N, V] fp32, row i sampled for seqs[i] -> the processed logits (the same tensor if none ask)."""
    params = [seq.params for seq in seqs]
    if not any(p.uses_processors for p in params):
        return logits
    logits = logits.clone()
    _mask_stop_tokens(logits, seqs)
    _add_bias(logits, params)
    if any(p.repetition_penalty != 1.0 for p in params):
        _repetition(logits, seqs)
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        _presence_frequency(logits, seqs)
    return logits


def _scatter(logits: torch.Tensor, rows: list[int], cols: list[int], values, accumulate: bool) -> None:
    if rows:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        logits.index_put_(index, torch.as_tensor(values, dtype=logits.dtype, device=logits.device), accumulate)


def _mask_stop_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows, cols = [], []
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            stops = [t for t in seq.stop_token_set if t < logits.shape[1]]
            rows += [row] * len(stops)
            cols += stops
    _scatter(logits, rows, cols, float("-inf"), accumulate=False)


def _add_bias(logits: torch.Tensor, params) -> None:
    rows, cols, values = [], [], []
    for row, p in enumerate(params):
        for token, bias in (p.logit_bias or {}).items():
            rows.append(row)
            cols.append(token)
            values.append(bias)
    _scatter(logits, rows, cols, values, accumulate=True)


def token_counts(token_lists: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """counts [N, V] (int32): how often each token occurs in each row's list."""
    lengths = torch.tensor([len(tokens) for tokens in token_lists], device=device)
    flat = torch.tensor([t for tokens in token_lists for t in tokens], dtype=torch.int64, device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
    counts = torch.zeros(len(token_lists), vocab_size, dtype=torch.int32, device=device)
    return counts.index_put_((rows, flat), torch.ones_like(flat, dtype=torch.int32), accumulate=True)


def _repetition(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    penalty = torch.tensor([seq.params.repetition_penalty for seq in seqs], device=logits.device)[:, None]
    seen = token_counts([seq.token_ids for seq in seqs], logits.shape[1], logits.device) > 0
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits.copy_(torch.where(seen, penalized, logits))


def _presence_frequency(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    presence = torch.tensor([seq.params.presence_penalty for seq in seqs], device=logits.device)[:, None]
    frequency = torch.tensor([seq.params.frequency_penalty for seq in seqs], device=logits.device)[:, None]
    counts = token_counts([seq.output_token_ids for seq in seqs], logits.shape[1], logits.device).float()
    logits -= presence * (counts > 0) + frequency * counts

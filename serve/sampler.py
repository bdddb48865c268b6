"""Token sampling for a batch of rows with per-row settings, with one host transfer per step.

`sample_tokens` stays on the device and never waits for it (per-row settings travel through pinned
memory), so the overlapped decode loop (serve/lookahead.py) can feed its result into the next step
before the host reads it; `sample` adds the host copy and the log-probabilities.

logits [N, V] fp32 (already soft-capped). Rows that ask for penalties, logit_bias or min_tokens are
processed first (serve/logits_processors.py; a batch that asks for none skips it). Greedy rows take the
argmax; the others are scaled by their temperature, cut by top-k then top-p (keeping at least one
token), and sampled with the exponential race (argmax of p / E, E ~ Exp(1)), which lets rows with their
own seed draw from their own generator.
Log-probabilities are of the model's distribution (before processors and temperature), as the OpenAI API
reports them.
"""

from __future__ import annotations

import torch

from serve.logits_processors import process
from serve.sequence import Sequence


def _to_device(values: list, device: torch.device, dtype=None) -> torch.Tensor:
    """Per-row settings on the device without a stream sync: a pageable host-to-device copy waits for
    the GPU, which would stall the overlapped loop behind the step still running."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    vocab = logits.shape[1]
    ks = _to_device([min(k, vocab) if k > 0 else vocab for k in top_k], logits.device)
    kth = logits.sort(dim=1, descending=True).values.gather(1, (ks - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    ps = _to_device(top_p, logits.device)[:, None]
    sorted_logits, order = logits.sort(dim=1, descending=True)
    probs = sorted_logits.softmax(dim=1)
    drop = probs.cumsum(dim=1) - probs > ps        # mass before this token already reaches top_p
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """probs [N, V] of the rows' sampling distributions: logits scaled by temperature (greedy rows: 1),
    cut by top-k then top-p, softmaxed. Speculative decoding applies it to draft and target alike."""
    temps = _to_device([p.temperature if p.temperature > 0 else 1.0 for p in params], logits.device)
    scaled = logits / temps[:, None]
    if any(p.top_k > 0 for p in params):
        scaled = _apply_top_k(scaled, [p.top_k for p in params])
    if any(p.top_p < 1 for p in params):
        scaled = _apply_top_p(scaled, [p.top_p for p in params])
    return scaled.softmax(dim=1)


def _noise(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    noise = torch.empty_like(probs).exponential_()
    for i, seq in enumerate(seqs):
        if getattr(seq, "generator", None) is not None:
            noise[i].exponential_(generator=seq.generator)
    return noise


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence], argmax: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row, int64 [N] on the logits' device; nothing here waits for the device.
    `argmax`: the logits' argmax where the step computed it already (the decode graphs do); processed
    logits have their own."""
    params = [seq.params for seq in seqs]
    processed = process(logits, seqs)
    if processed is not logits:
        logits, argmax = processed, None
    tokens = logits.argmax(dim=1) if argmax is None else argmax
    if not all(p.greedy for p in params):
        greedy = _to_device([p.greedy for p in params], logits.device)
        probs = filtered_probs(logits, params)
        tokens = torch.where(greedy, tokens, (probs / _noise(probs, seqs)).argmax(dim=1))
    return tokens


def sample(logits: torch.Tensor, seqs: list[Sequence], argmax: torch.Tensor | None = None
           ) -> tuple[list[int], list[dict | None]]:
    """Next token per row, and per row {token: logprob, ...top alternatives} when logprobs was asked."""
    token_list = sample_tokens(logits, seqs, argmax).tolist()      # the step's one host sync
    return token_list, _logprobs(logits, token_list, [seq.params for seq in seqs])


def _logprobs(logits: torch.Tensor, tokens: list[int], params) -> list[dict | None]:
    wanted = [p.logprobs for p in params]
    if all(w is None for w in wanted):
        return [None] * len(tokens)
    logp = logits.log_softmax(dim=1)
    top = logp.topk(max(w or 0 for w in wanted) or 1, dim=1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    top_ids, top_vals = top.indices.tolist(), top.values.tolist()
    result = []
    for i, w in enumerate(wanted):
        if w is None:
            result.append(None)
            continue
        entry = {"token": tokens[i], "logprob": chosen[i], "top": list(zip(top_ids[i][:w], top_vals[i][:w]))}
        result.append(entry)
    return result

"""Perplexity of a causal LM over windows of held-out text, each window starting with BOS.

The text is cut into consecutive non-overlapping windows of `seq_len` tokens: BOS followed by
`seq_len - 1` text tokens; every text token is predicted once, from the tokens before it in its
window (so perplexity is comparable across models only at the same `seq_len`). Perplexity is
`exp(total NLL / number of predicted tokens)`.

Held-out text: any file or directory (`compress.data.calib.read_text`); a `tail` F keeps only the last
fraction F of its documents, e.g. the Wikipedia articles that calibration did not use. `measure` reads the
`--ppl-*` settings that `compress eval --perplexity` and `python -m evals.perplexity` share
(compress.commands._common.add_perplexity_flags).
"""

from __future__ import annotations

import math

import torch


def heldout_ids(tokenizer, path, tail: float | None = None) -> torch.Tensor:
    """`[T]` token ids of the held-out text (optionally only its last `tail` fraction of documents)."""
    from compress.data import calib
    from compress.errors import UserError

    docs = calib.split_documents(calib.read_text(path))
    if tail is not None:
        if not 0.0 < tail < 1.0:
            raise UserError(f"--ppl-tail must be in (0, 1), got {tail}")
        docs = calib.head_and_tail(docs, 1.0 - tail)[1]
    return calib.token_stream(tokenizer, docs)


def make_windows(stream: torch.Tensor, bos_id: int, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """`[W, seq_len]` consecutive windows of `stream`, each led by BOS; the ragged tail is dropped."""
    from compress.errors import UserError

    if seq_len < 2:
        raise UserError(f"--ppl-seq-len must be at least 2, got {seq_len}")
    body = seq_len - 1
    count = len(stream) // body
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise UserError(f"held-out text has {len(stream)} tokens, fewer than one window of {seq_len}")
    rows = stream[: count * body].view(count, body)
    return torch.cat([torch.full((count, 1), bos_id, dtype=torch.long), rows], dim=1)


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> dict:
    """Perplexity of `model` on `[W, L]` windows: predictions of positions 1..L-1 of each window."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, leave=False):
        ids = windows[start:start + batch_size].to(device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1].float()  # [B, L-1, V]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    return {"perplexity": math.exp(total_nll / total_tokens), "nll": total_nll / total_tokens,
            "num_tokens": total_tokens, "num_windows": len(windows)}


def measure(model, tokenizer, args) -> dict:
    """Perplexity on `args.perplexity` with the `--ppl-*` options; the result dict (with the settings)."""
    from compress.data.calib import bos_token_id

    stream = heldout_ids(tokenizer, args.perplexity, args.ppl_tail)
    windows = make_windows(stream, bos_token_id(tokenizer), args.ppl_seq_len, args.ppl_max_windows)
    result = perplexity(model, windows, args.ppl_batch_size)
    result.update(text=str(args.perplexity), tail=args.ppl_tail, seq_len=args.ppl_seq_len)
    return result

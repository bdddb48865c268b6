"""The draft and verify passes of a speculative step on CUDA graphs (serve/cuda_graphs.py; on the CPU
the same packing and padding run eagerly). speculator.py decides which steps come here.

A step fits when it is pure decode (one token per sequence, every one sampling) with at most
config.spec_graph_batch sequences; its draft passes fit when every drafting sequence catches up over
1 or 2 tokens (`draft_fits`): 1 after a step that rejected a draft, 2 after one that kept all k (the
draft never computed d_k). Longer lags (after a prompt or a stretch of k = 0) run pass 1 eagerly.
- Draft pass 1 (the draft's graphs of query length q = the longest lag): each catch-up span padded to
  q, its last real token's logits propose d_1. Passes 2..k are decode steps of the sequences still
  drafting (a row whose cap is reached drops out). Greedy rows chain on the device: pass j's rows take
  their token from the argmax pass j-1 left in the graphs' `tokens` buffer (src_rows), each pass's
  argmax is copied aside, and one read after the last pass brings every drafted token to the host. A
  batch with a sampled row samples on the host after each pass (a read per pass) and feeds the tokens
  back as ids.
- Verify (the target's verify graphs, q = 1 + the most drafted tokens): row i is [last token,
  d_1..d_n] padded to q; a row that drafts nothing (cap 0, logprobs) has n = 0 and samples its first
  logits row. The target's argmax comes back in one read for every row, which is all greedy acceptance
  needs from the host.
"""

from __future__ import annotations

import torch

from serve.model_runner import Span


def draft_fits(spans: list[Span]) -> bool:
    """Whether draft pass 1 can run on the draft's graphs (every span a whole catch-up of 1 or 2 tokens)."""
    return all(span.num_logits == 1 and len(span.ids) <= 2 for span in spans)


def draft_passes(graphs, spans: list[Span], lengths: dict, drafts: dict, sample) -> int:
    """Run passes 1..k on the draft's graphs, appending each draft's tokens; `sample(logits, owners)` is
    the speculator's host-side sampling of one pass. Returns the number of passes."""
    q = max(len(span.ids) for span in spans)
    owners = [drafts[span.seq.seq_id] for span in spans]
    rows = [i * q + len(span.ids) - 1 for i, span in enumerate(spans)]
    logits = graphs.run_spans(spans, q)                  # [N * q, V]
    num_passes = max(lengths[d.seq.seq_id] for d in owners)
    if all(d.seq.params.greedy for d in owners):
        _chain_greedy(graphs, owners, rows, lengths, num_passes)
    else:
        sample(logits[rows], owners)
        for j in range(2, num_passes + 1):
            owners = [d for d in owners if lengths[d.seq.seq_id] >= j]
            logits = graphs.run_spans([_next_span(d, j, d.tokens[-1:]) for d in owners], 1)
            sample(logits, owners)
    return num_passes


def _next_span(draft, j: int, ids: list[int]) -> Span:
    """Pass j of a draft: d_{j-1} at position num_tokens + j - 2."""
    return Span(draft.seq, draft.seq.num_tokens + j - 2, ids, 1)


def _chain_greedy(graphs, owners: list, rows: list[int], lengths: dict, num_passes: int) -> None:
    """Passes 2..k fed from the device; one host read at the end. Each pass's whole argmax is copied
    aside on the device (indexing it with a host list would wait for the device) and its rows are
    picked on the host."""
    picked, members = [graphs.argmax.clone()], [list(range(len(owners)))]
    source = dict(enumerate(rows))           # owner -> its row in the previous pass's argmax
    for j in range(2, num_passes + 1):
        keep = [i for i in members[-1] if lengths[owners[i].seq.seq_id] >= j]
        graphs.run_spans([_next_span(owners[i], j, [0]) for i in keep], 1, src_rows=[source[i] for i in keep])
        picked.append(graphs.argmax.clone())     # the next pass overwrites the buffer
        members.append(keep)
        source = {i: row for row, i in enumerate(keep)}
    tokens = torch.cat(picked).tolist()
    offset = len(picked[0])
    for i, row in enumerate(rows):
        owners[i].tokens.append(tokens[row])
    for keep in members[1:]:
        for row, i in enumerate(keep):
            owners[i].tokens.append(tokens[offset + row])
        offset += len(keep)


def verify_pass(graphs, batch, drafts: dict) -> tuple[torch.Tensor, list[int], int]:
    """(logits [B * q, V] of the padded rows, their argmax on the host, q); each draft gets its rows'
    logits and argmax."""
    q = 1 + max(len(d.tokens) for d in drafts.values())
    spans = []
    for seq in batch.seqs:
        draft, start = drafts.get(seq.seq_id), seq.num_computed_tokens
        spans.append(Span(seq, start, [seq.token_ids[start]] + (draft.tokens if draft else []), 1))
    logits = graphs.run_spans(spans, q)
    argmax = graphs.argmax.tolist()
    for i, span in enumerate(spans):
        draft = drafts.get(span.seq.seq_id)
        if draft is not None:
            rows = slice(i * q, i * q + len(span.ids))
            draft.target_logits, draft.target_argmax = logits[rows], argmax[rows]
    return logits, argmax, q

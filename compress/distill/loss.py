"""The distillation loss, KL(teacher || student) of the next-token distributions, and held-out comparisons.

Gemma's vocabulary (262k) makes `[B, S, V]` logits with their autograd state the largest tensors of a step,
so, as in the Fisher pass (compress.pruning.lm_scores), the student's final hidden states are detached, the
loss is pushed through the LM head `LOSS_ROWS` positions at a time into their gradient, and that gradient is
back-propagated through the layers once. Every position counts (the last one too: no label is needed); the
softmaxes are fp32, at temperature 1 (the teacher's own distribution, as in Minitron). The loss is the mean
KL over positions, in nats.

`compare` measures a student against its teacher on held-out windows: perplexity of the text, KL, and top-1
agreement (how often the student's greedy token is the teacher's: the acceptance rate of a greedy draft).
"""

from __future__ import annotations

import math

import torch

from compress.device import autocast

LOSS_ROWS = 1024  # positions per LM-head chunk: bounds the [rows, vocab] logits in memory


def kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """`[n]` KL(teacher || student) per row of `[n, V]` logits, in fp32."""
    t = teacher_logits.float().log_softmax(-1)
    return (t.exp() * (t - student_logits.float().log_softmax(-1))).sum(-1)


def logit_chunks(student, teacher, s_hidden: torch.Tensor, t_hidden: torch.Tensor):
    """(row slice, student logits, teacher logits), fp32, of `[N, hidden]` final hidden states through the
    two LM heads (`student`, `teacher`: architecture adapters), `LOSS_ROWS` rows at a time (no gradient kept
    unless the caller's context keeps one)."""
    for r0 in range(0, len(s_hidden), LOSS_ROWS):
        rows = slice(r0, r0 + LOSS_ROWS)
        with autocast(s_hidden.device):
            s, t = student.lm_logits(s_hidden[rows]).float(), teacher.lm_logits(t_hidden[rows]).float()
        yield rows, s, t


def kd_loss_grad(student, teacher, s_hidden: torch.Tensor, t_hidden: torch.Tensor):
    """(gradient of the mean KL w.r.t. `s_hidden` `[B, S, hidden]`, mean KL) through the two LM heads
    (`student`, `teacher`: architecture adapters), chunked over positions."""
    h = s_hidden.detach().flatten(0, 1).requires_grad_(True)  # [B*S, hidden]
    t = t_hidden.detach().flatten(0, 1)
    n, total = len(h), 0.0
    for r0 in range(0, n, LOSS_ROWS):
        with autocast(h.device):
            s_logits = student.lm_logits(h[r0:r0 + LOSS_ROWS])
            with torch.no_grad():
                t_logits = teacher.lm_logits(t[r0:r0 + LOSS_ROWS])
        kl = kl_rows(s_logits, t_logits).sum()
        (kl / n).backward()
        total += float(kl.detach())
    return h.grad.view_as(s_hidden), total / n


@torch.no_grad()
def compare(student, teacher, windows: torch.Tensor, batch_size: int) -> dict:
    """Perplexity of `student` (a causal LM) on `[W, L]` windows, its KL to `teacher` and top-1 agreement,
    over the predictions of positions 1..L-1 of each window (LM heads `LOSS_ROWS` positions at a time)."""
    from compress.arch import get_adapter

    s_adapter, t_adapter = get_adapter(student), get_adapter(teacher)
    device = next(student.parameters()).device
    nll = kl = agree = 0.0
    count = 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size].to(device)
        with autocast(device):
            s_hidden = s_adapter.final_hidden(ids)[:, :-1].flatten(0, 1)  # [B*(L-1), hidden]
            t_hidden = t_adapter.final_hidden(ids)[:, :-1].flatten(0, 1)
        targets = ids[:, 1:].flatten()
        for rows, s, t in logit_chunks(s_adapter, t_adapter, s_hidden, t_hidden):
            nll += float(torch.nn.functional.cross_entropy(s, targets[rows], reduction="sum"))
            kl += float(kl_rows(s, t).sum())
            agree += float((s.argmax(-1) == t.argmax(-1)).sum())
        count += len(targets)
    return {"perplexity": math.exp(nll / count), "kl": kl / count, "agreement": agree / count, "num_tokens": count}

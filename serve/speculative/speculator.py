"""One speculative step: choose k, draft, verify in one target forward, accept, roll back.

Per step (the engine calls `run`, then scheduler.advance, then `accept` and `settle`):
1. Sequences that decode one token, sample it, and need nothing per token from the host
   (no logprobs, no logits processors) may speculate; each drafts min(k, cap) tokens, cap keeping the
   output within max_tokens and within the request's max_speculative_tokens. k is fixed or chosen for
   goodput (goodput.py), and shrinks so that the verify pass stays within max_num_batched_tokens.
2. The draft is lazy: it runs only for sequences that draft this step, so a step with k = 0 (or a
   sequence whose cap is 0, or a prompt being prefilled) costs the draft nothing and its KV lags the
   target's (`seq.num_draft_computed`). A drafting sequence first catches up: draft pass 1 computes every
   token the draft has not seen (a multi-token query through the paged prefill path, up to the token
   scheduled now); its last logits give d_1. The catch-up of all sequences shares a budget of
   max_num_batched_tokens; a sequence too far behind for what is left computes a chunk of its lag and
   drafts in a later step. Slots are reserved now in both models (the draft's from its own computed
   count); a sequence whose slots cannot be had without preempting anyone drafts nothing.
   Passes 2..k feed d_{j-1}.
3. One target forward verifies: each speculating sequence computes [last token, d_1..d_k] (query length
   k+1 through the paged prefill path), the others their scheduled tokens.
4. rejection.py keeps a prefix of the drafts and adds one target token; the engine appends them (a stop
   token, stop string or max_tokens ends the sequence there). `settle` moves the computed counts to the
   kept tokens and gives back the blocks of rejected ones (BlockManager.trim).

Steps that fit (pure decode, at most config.spec_graph_batch sequences) run their passes on CUDA graphs
(graph_passes.py: the draft's decode graphs, the target's verify graphs; on the CPU the same padded
steps run eagerly); the others, and a draft pass 1 over a lag of more than 2, run eagerly through
`ModelRunner.run_spans`. SpecStats counts verifying steps of both kinds; `auto` costs each step with
the timings of the path it will take.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from serve.config import MAX_SPECULATIVE_TOKENS
from serve.model_runner import Span
from serve.sampler import filtered_probs
from serve.scheduler import ScheduledBatch
from serve.sequence import Sequence
from serve.speculative.goodput import (
    Acceptance,
    BatchTimeModel,
    StepShape,
    choose_length,
)
from serve.speculative.graph_passes import draft_fits, draft_passes, verify_pass
from serve.speculative.profile import measure, measure_decode, measure_graphs
from serve.speculative.rejection import draw, greedy_accept, rejection_sample


@dataclass
class Draft:
    """One sequence's proposal and what the target made of it."""
    seq: Sequence
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)     # q_j [V] per token (sampled rows)
    target_logits: torch.Tensor | None = None                   # [k+1, V]
    target_argmax: list[int] | None = None                      # their argmax, read with the batch's


@dataclass
class SpecStats:
    num_drafted: int = 0           # draft tokens proposed
    num_accepted: int = 0          # of them kept
    num_verified: int = 0          # sequence-steps that speculated
    chosen: dict = field(default_factory=dict)     # k -> steps that chose it
    num_graph_steps: int = 0       # steps that verified with every pass on CUDA graphs
    num_eager_steps: int = 0       # steps that verified with a pass or more run eagerly

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per speculating sequence-step (kept drafts plus the target's token)."""
        return (self.num_accepted + self.num_verified) / self.num_verified if self.num_verified else 0.0

    def summary(self) -> str:
        chosen = ", ".join(f"k={k}: {n}" for k, n in sorted(self.chosen.items()))
        return (f"speculation: {self.num_accepted}/{self.num_drafted} drafted tokens accepted "
                f"({self.acceptance_rate:.1%}), {self.mean_accepted_length:.2f} tokens per verify; "
                f"steps by length: {chosen or 'none'}; {self.num_graph_steps} steps on graphs, "
                f"{self.num_eager_steps} eager")


def _sync(device) -> None:
    """Step times are measured on the host: wait for the device where it runs ahead."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _target_copies(batch: ScheduledBatch) -> ScheduledBatch:
    """The batch with only the target's block copies (the draft's groups have tuple keys)."""
    return dataclasses.replace(batch, copies=[c for c in batch.copies if not isinstance(c[0], tuple)])


def _request_cap(seq: Sequence) -> int:
    cap = seq.params.max_speculative_tokens
    return MAX_SPECULATIVE_TOKENS if cap is None else cap


def can_speculate(seq: Sequence) -> bool:
    params = seq.params
    return seq.forked and params.logprobs is None and not params.uses_processors


class Speculator:
    def __init__(self, config, target, draft, block_manager):
        self.config, self.target, self.draft, self.block_manager = config, target, draft, block_manager
        self.auto = config.num_speculative_tokens == "auto"
        self.k_max = MAX_SPECULATIVE_TOKENS if self.auto else config.num_speculative_tokens
        self.stats = SpecStats()
        self.draft_time, self.target_time, self.decode_time = BatchTimeModel(), BatchTimeModel(), BatchTimeModel()
        # the passes of steps on graphs (graph_passes.py): the draft's decode step, the target's verify
        self.draft_graph_time, self.verify_time = BatchTimeModel(), BatchTimeModel()
        self.graph_batch = 0 if target.verify_graphs is None or draft.decode_graphs is None else \
            target.verify_graphs.max_batch
        if self.auto:
            self._profile()

    def _profile(self) -> None:
        """Start-up timings of the passes steps will run (profile.py), eager and on graphs."""
        config, target, draft = self.config, self.target, self.draft
        tokens = config.max_num_batched_tokens
        self.draft_time = measure(draft, config.max_num_seqs, tokens)
        self.target_time = measure(target, config.max_num_seqs, tokens)
        self.decode_time = measure_decode(target, config.max_num_seqs)
        if self.graph_batch:
            graphs = measure_graphs(draft, draft.decode_graphs, (1,))
            # past the graphs' batch a draft pass runs eagerly
            self.draft_graph_time = BatchTimeModel({**{n: t for n, t in self.draft_time.points.items()
                                                       if n > self.graph_batch}, **graphs.points})
            self.verify_time = measure_graphs(target, target.verify_graphs, target.verify_graphs.query_lens)

    def startup_lines(self) -> list[str]:
        mode = "auto (goodput)" if self.auto else str(self.k_max)
        line = (f"speculative decoding: draft {self.config.draft}, up to {self.k_max} tokens per step, length "
                f"{mode}; {self._graph_mode()}")
        return [line]

    def _graph_mode(self) -> str:
        verify = self.target.verify_graphs
        if not self.graph_batch:
            reason = "fast path off" if self.target.decode_graphs is None else "max_spec_graph_batch 0 or k = 0"
            return f"draft and verify passes run eagerly ({reason})"
        where = f"in steps of up to {self.graph_batch} sequences (verify query lengths 2..{verify.max_q})"
        if verify.graphs and self.draft.decode_graphs.graphs:
            return f"draft and verify passes replay CUDA graphs {where}"
        return (f"draft and verify passes run the graphs' padded steps eagerly {where}, no CUDA graphs "
                f"({self.target.eager_reason()})")

    # ---- before the model runs ----------------------------------------------------------------
    def _plan(self, batch: ScheduledBatch) -> tuple[dict[int, int], list[Span]]:
        """(seq_id -> tokens to draft, the draft's catch-up spans); slots reserved in both models."""
        rows = [i for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                if n == 1 and batch.samples(i) and can_speculate(seq)]
        seqs = [batch.seqs[i] for i in rows]
        caps = [max(0, min(self.k_max, _request_cap(seq), seq.max_num_tokens - seq.num_tokens - 1)) for seq in seqs]
        if not seqs:
            return {}, []
        k = self._choose(batch, seqs, caps)
        room = self.config.max_num_batched_tokens - sum(batch.num_new_tokens)
        while k > 0 and sum(min(k, cap) for cap in caps) > room:
            k -= 1
        self.stats.chosen[k] = self.stats.chosen.get(k, 0) + 1
        lengths, spans, budget = {}, [], self.config.max_num_batched_tokens
        for seq, cap in zip(seqs, caps):
            n = min(k, cap)
            span = self._reserve(batch, seq, n, budget) if n > 0 and budget > 0 else None
            if span is not None:
                spans.append(span)
                budget -= len(span.ids)
                if span.num_logits:
                    lengths[seq.seq_id] = n
        return lengths, spans

    def _reserve(self, batch: ScheduledBatch, seq: Sequence, n: int, budget: int) -> Span | None:
        """The draft's catch-up span of a sequence that drafts n tokens, its slots reserved in both models
        (None where they cannot be had); past `budget`, a chunk of the catch-up that drafts nothing."""
        manager, start = self.block_manager, seq.num_draft_computed
        lag = seq.num_computed_tokens + 1 - start          # through the token scheduled this step
        if lag > budget:
            if not manager.can_append(seq, budget, draft=True):
                return None
            batch.copies += manager.append_slots(seq, budget, draft=True)
            return Span(seq, start, seq.token_ids[start:start + budget], 0)
        # the target verifies [last token, d_1..d_n]; the draft writes its lag and d_1..d_{n-1}
        if not (manager.can_append(seq, 1 + n) and manager.can_append(seq, lag + n - 1, draft=True)):
            return None
        batch.copies += manager.append_slots(seq, 1 + n) + manager.append_slots(seq, lag + n - 1, draft=True)
        return Span(seq, start, seq.token_ids[start:start + lag], 1)

    def _choose(self, batch: ScheduledBatch, seqs: list[Sequence], caps: list[int]) -> int:
        if not self.auto:
            return self.k_max
        rates = [(seq.acceptance or Acceptance()).rate for seq in seqs]
        lags = [seq.num_computed_tokens + 1 - seq.num_draft_computed for seq in seqs]
        remaining = [seq.max_num_tokens - seq.num_tokens for seq in seqs]
        shape = StepShape(sum(batch.num_new_tokens) - len(seqs), batch.num_sampling - len(seqs), lags, remaining)
        decode = self.decode_time if batch.is_pure_decode else None
        draft, target = (self.draft_graph_time, self.verify_time) if self._on_graphs(batch) else \
            (self.draft_time, self.target_time)
        return choose_length(rates, caps, self.k_max, shape, draft, target, decode)

    def _on_graphs(self, batch: ScheduledBatch) -> bool:
        """Whether the step's passes fit the graphs (a draft pass 1 over a long lag still runs eagerly)."""
        return batch.is_pure_decode and len(batch) <= self.graph_batch

    def _copy_draft_blocks(self, copies: list[tuple]) -> None:
        self.draft.copy_blocks([(key[1], src, dst) for key, src, dst in copies if isinstance(key, tuple)])

    # ---- the passes -----------------------------------------------------------------------------
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor, list[Draft]]:
        """(sequences that sample without speculating, their logits [N, V], the drafts verified)."""
        lengths, spans = self._plan(batch)
        self._copy_draft_blocks(batch.copies)
        drafts = {seq.seq_id: Draft(seq) for seq in batch.seqs if seq.seq_id in lengths}
        on_graphs = self._on_graphs(batch)
        draft_on_graphs = on_graphs and bool(spans) and draft_fits(spans)
        if draft_on_graphs:
            self._draft_on_graphs(spans, lengths, drafts)
        else:
            self._draft(spans, lengths, drafts)
        if not drafts:
            return self._plain(batch)
        self.target.copy_blocks(_target_copies(batch).copies)
        if draft_on_graphs:
            self.stats.num_graph_steps += 1
        else:
            self.stats.num_eager_steps += 1
        return self._verify_on_graphs(batch, drafts) if on_graphs else self._verify(batch, drafts)

    def _plain(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor, list[Draft]]:
        """The target's own step (its decode graphs where they apply), timed for goodput.py."""
        start = time.perf_counter()
        logits = self.target.run(_target_copies(batch))
        if batch.is_pure_decode:
            _sync(self.target.device)
            self.decode_time.observe(len(batch), time.perf_counter() - start)
        return [seq for i, seq in enumerate(batch.seqs) if batch.samples(i)], logits, []

    def _draft(self, spans: list[Span], lengths: dict, drafts: dict) -> None:
        """Catch-up (pass 1, which proposes d_1), then passes 2..k; nothing where no span was planned."""
        if not spans:
            return
        self._propose(spans, drafts)
        for span in spans:
            span.seq.num_draft_computed = span.start + len(span.ids)
        for j in range(2, max(lengths.values(), default=0) + 1):
            spans = [Span(d.seq, d.seq.num_tokens + j - 2, d.tokens[-1:], 1)
                     for d in drafts.values() if lengths[d.seq.seq_id] >= j]
            self._propose(spans, drafts)

    def _draft_on_graphs(self, spans: list[Span], lengths: dict, drafts: dict) -> None:
        """Passes 1..k on the draft's graphs (graph_passes.py); their time is split evenly between them."""
        start = time.perf_counter()
        num_passes = draft_passes(self.draft.decode_graphs, spans, lengths, drafts, self._sample_drafts)
        for span in spans:
            span.seq.num_draft_computed = span.start + len(span.ids)
        _sync(self.draft.device)
        self.draft_graph_time.observe(len(spans), (time.perf_counter() - start) / num_passes)

    def _verify_on_graphs(self, batch: ScheduledBatch, drafts: dict) -> tuple[list[Sequence], torch.Tensor, list[Draft]]:
        """The verify pass on the target's graphs: every row of the batch, padded (graph_passes.py)."""
        begin = time.perf_counter()
        logits, _, q = verify_pass(self.target.verify_graphs, batch, drafts)
        plain = [(i, seq) for i, seq in enumerate(batch.seqs) if seq.seq_id not in drafts]
        result = ([seq for _, seq in plain], logits[[i * q for i, _ in plain]], list(drafts.values()))
        self.verify_time.observe(len(batch) * q, time.perf_counter() - begin)     # the argmax read synced
        return result

    def _propose(self, spans: list[Span], drafts: dict) -> None:
        """Run a draft pass and append each logits row's proposal to its sequence's draft."""
        start = time.perf_counter()
        logits = self.draft.run_spans(spans)
        owners = [drafts[span.seq.seq_id] for span in spans if span.num_logits]
        if owners:
            self._sample_drafts(logits, owners)
        _sync(self.draft.device)
        self.draft_time.observe(sum(len(span.ids) for span in spans), time.perf_counter() - start)

    def _sample_drafts(self, logits: torch.Tensor, owners: list[Draft]) -> None:
        tokens = logits.argmax(dim=1)
        sampled = [not d.seq.params.greedy for d in owners]
        probs = None
        if any(sampled):
            probs = filtered_probs(logits, [d.seq.params for d in owners])
            for row, draft in enumerate(owners):
                if sampled[row]:
                    tokens[row] = draw(probs[row:row + 1], draft.seq.generator)[0]
        for row, (draft, token) in enumerate(zip(owners, tokens.tolist())):
            draft.tokens.append(token)
            if sampled[row]:
                draft.probs.append(probs[row])

    def _verify(self, batch: ScheduledBatch, drafts: dict) -> tuple[list[Sequence], torch.Tensor, list[Draft]]:
        spans, plain = [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            draft = drafts.get(seq.seq_id)
            if draft is None:
                spans.append(Span(seq, start, seq.token_ids[start:start + n], int(batch.samples(i))))
                plain += [seq] if batch.samples(i) else []
            else:
                spans.append(Span(seq, start, [seq.token_ids[start]] + draft.tokens, len(draft.tokens) + 1))
        begin = time.perf_counter()
        logits = self.target.run_spans(spans)
        rows, plain_rows = 0, []
        for span in spans:
            if span.seq.seq_id in drafts:
                drafts[span.seq.seq_id].target_logits = logits[rows:rows + span.num_logits]
            elif span.num_logits:
                plain_rows.append(rows)
            rows += span.num_logits
        result = (plain, logits[plain_rows], list(drafts.values()))
        greedy = [d for d in drafts.values() if d.seq.params.greedy]
        if greedy:       # one host read for every greedy draft, not one each
            argmax = torch.cat([d.target_logits for d in greedy]).argmax(dim=1).tolist()
            for d in greedy:
                d.target_argmax, argmax = argmax[:len(d.tokens) + 1], argmax[len(d.tokens) + 1:]
        _sync(self.target.device)
        self.target_time.observe(sum(len(span.ids) for span in spans), time.perf_counter() - begin)
        return result

    # ---- after the model ran ------------------------------------------------------------------
    def accept(self, draft: Draft) -> list[int]:
        """The tokens to append for one verified draft (1..k+1)."""
        logits = draft.target_logits
        if draft.seq.params.greedy:
            return greedy_accept(draft.tokens, draft.target_argmax or logits.argmax(dim=1).tolist())
        k, generator = len(draft.tokens), draft.seq.generator
        target = filtered_probs(logits, [draft.seq.params] * (k + 1))
        uniform = torch.rand(k, generator=generator, device=logits.device)
        noise = torch.empty(logits.shape[1], device=logits.device).exponential_(generator=generator)
        tokens = torch.tensor(draft.tokens, device=logits.device)
        return rejection_sample(tokens, torch.stack(draft.probs), target, uniform, noise)

    def settle(self, draft: Draft, num_kept: int) -> None:
        """After the accepted tokens were appended to a sequence still running: its KV counts follow
        the kept drafts; slots of rejected ones are given back."""
        seq, k = draft.seq, len(draft.tokens)
        start = seq.num_computed_tokens          # scheduler.advance counted the verify's first token
        seq.num_computed_tokens = start + num_kept
        seq.num_draft_computed = start + min(num_kept, k - 1)
        self.block_manager.commit(seq)
        self.block_manager.trim(seq)
        seq.acceptance = seq.acceptance or Acceptance()
        seq.acceptance.update(num_kept, k)

    def record(self, draft: Draft, num_kept: int) -> None:
        self.stats.num_drafted += len(draft.tokens)
        self.stats.num_accepted += num_kept
        self.stats.num_verified += 1

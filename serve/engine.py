"""The engine loop (the offline API over it is serve/llm.py).

One `step()`: scheduler.schedule -> model_runner.run (logits of the sequences that finish a prompt or
decode) -> scheduler.advance (KV bookkeeping) -> fork requests with n > 1 -> sampler -> append tokens,
detokenize, check EOS / stop strings / max_tokens -> RequestOutput for every request that moved.
Runs of pure decode steps on the fast path overlap instead (serve/lookahead.py): each `step()` launches
the next decode step before it reads, appends and reports the tokens of the one already in flight.
With a draft model (serve/speculative/), every step is speculative instead: the speculator drafts and
verifies, the sequences that drafted append their accepted tokens, the others sample as above.

Failure isolation: an error in sampling a row or in appending its token fails that request alone (its
sequences finish with reason "error", its blocks are freed, its output carries `error`) and the step
goes on for the others; `fail_running` is what the caller uses when a step raised anywhere else.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import torch

from serve.block_manager import BlockManager
from serve.config import EngineConfig
from serve.detokenizer import IncrementalDetokenizer
from serve.lookahead import InFlight, Lookahead
from serve.memory import startup_report
from serve.metrics import Metrics
from serve.model_runner import ModelRunner
from serve.outputs import CompletionOutput, RequestOutput, failure_message
from serve.sampler import sample
from serve.sampling_params import SamplingParams
from serve.scheduler import ScheduledBatch, Scheduler
from serve.sequence import Sequence, SequenceStatus
from serve.speculative import Speculator, make_runners
from serve.speculative.proposer import check_tokenizers

log = logging.getLogger("serve")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} has no usable tokenizer ({str(err).splitlines()[0]})") from None


def eos_token_ids(path: str, spec_eos: list[int], tokenizer) -> set[int]:
    ids = set(spec_eos)
    gen_file = Path(path) / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def make_runner(config: EngineConfig):
    if config.tensor_parallel_size > 1:
        from serve.distributed.runner import TensorParallelRunner
        return TensorParallelRunner(config)
    return ModelRunner(config)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner, draft = make_runners(config) if config.draft is not None else (make_runner(config), None)
        self.tokenizer = load_tokenizer(config.model)
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = eos_token_ids(config.model, self.runner.spec.eos_token_ids, self.tokenizer)
        plan = self.runner.block_plan if draft is None else {**self.runner.block_plan, **draft.table_plan}
        self.block_manager = BlockManager(plan, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.lookahead = Lookahead(config, self.runner, self.scheduler)
        self.speculator = None if draft is None else self._speculator(draft)
        self.requests: dict[str, list[Sequence]] = {}
        self.metrics = Metrics()
        self.errors: dict[str, str] = {}       # request id -> what failed it, until its output is made
        self._failed: list[str] = []            # requests failed during this step
        self.startup_report = startup_report(self.runner)   # KV blocks and tokens, memory, decode mode
        if self.speculator is not None:
            self.startup_report += self.speculator.startup_lines()
        self._ids = itertools.count()
        # False (offline batches): text is decoded once at the end and step() reports only finished
        # requests, which keeps per-token host work off the decode loop.
        self.stream_outputs = True

    def _speculator(self, draft) -> Speculator:
        check_tokenizers(self.tokenizer, load_tokenizer(self.config.draft))
        self.lookahead.enabled = False      # a speculative step reads its tokens before the next one
        return Speculator(self.config, self.runner, draft, self.block_manager)

    @property
    def kv_cache_tokens(self) -> int:
        """Tokens the KV cache holds: of the full-attention layers, else of the widest sliding window."""
        plan = self.runner.block_plan
        if not plan:
            return 0
        key = None if None in plan else max(plan)
        return plan[key] * self.config.block_size

    # ---- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.tokenizer(prompt)["input_ids"]

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError with an OpenAI-style message for a request this engine cannot serve."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self.runner.spec.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.runner.spec.vocab_size})")
        max_n = min(self.config.max_n, self.config.max_num_seqs)     # more could never be scheduled at once
        if params.n > max_n:
            raise ValueError(f"n={params.n} is over the limit of {max_n}")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_model_len}")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens={params.max_tokens} plus the {len(prompt_ids)} prompt tokens is past "
                             f"this model's context of {self.max_model_len}")
        vocab = self.runner.spec.vocab_size
        if any(t >= vocab for t in [*params.stop_token_ids, *(params.logit_bias or {})]):
            raise ValueError(f"stop_token_ids and logit_bias keys must be token ids below {vocab}")

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        request_id = request_id or f"req-{next(self._ids)}"
        prompt_ids = self.tokenize(prompt)
        self.check_request(prompt_ids, params)
        seq = Sequence(request_id, prompt_ids, params)
        self._init_seq(seq)
        self.requests[request_id] = [seq]
        self.scheduler.add(seq)
        self.metrics.prompt_tokens += len(prompt_ids)
        return request_id

    def _init_seq(self, seq: Sequence) -> None:
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.token_ids[:seq.num_prompt_tokens],
                                                 seq.params.skip_special_tokens)
        for token in seq.output_token_ids:
            seq.detokenizer.add(token)
        params = seq.params
        seq.stop_token_set = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        seq.max_num_tokens = min(seq.num_prompt_tokens + params.max_tokens, self.max_model_len)
        # the overlapped loop samples before the host has the previous token: nothing may need the host
        seq.can_overlap = (params.logprobs is None and params.seed is None and not params.stop
                           and not params.uses_processors)
        seq.generator = None
        if params.seed is not None:
            seq.generator = torch.Generator(self.runner.device).manual_seed(params.sample_seed(seq.sample_index))

    def abort_request(self, request_id: str) -> None:
        self.errors.pop(request_id, None)
        if self.requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)
            self.metrics.aborted += 1

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def close(self) -> None:
        """Release the runner's processes (tensor-parallel workers); the engine is unusable after."""
        self.runner.close()

    def fail_running(self, err: Exception) -> list[RequestOutput]:
        """After a step raised outside the per-request guards: fail the requests it was running (waiting
        ones were not touched), drop the step in flight, and return their outputs."""
        self.lookahead.pending = None
        for request_id, seqs in list(self.requests.items()):
            if any(seq.status is SequenceStatus.RUNNING for seq in seqs):
                self._fail(request_id, err)
        return self._outputs([])

    def _fail(self, request_id: str, err: Exception) -> None:
        """Finish a request that hit an error of its own (the caller logs it); its next output says so."""
        self.scheduler.abort(request_id)
        for seq in self.requests[request_id]:
            if not seq.is_finished:         # lost from the queues by a step that raised while scheduling
                self.scheduler.finish(seq, "error")
            seq.finish_reason = "error"
        self.errors[request_id] = failure_message(err)
        self._failed.append(request_id)
        self.metrics.failed += 1

    # ---- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step; outputs of the requests that moved (offline: that finished). In a run of
        overlapped decode steps, a call first launches the next step, then reports the one in flight."""
        lookahead = self.lookahead
        if lookahead.pending is None:
            batch = self.scheduler.schedule()
            if not batch.seqs:
                return []
            if not lookahead.can_defer(batch):
                return self._step_sync(batch)
            lookahead.start(batch)
        current = lookahead.pending
        following = lookahead.launch_next()        # queued on the device behind `current`
        outputs = self._resolve(current)
        lookahead.pending = lookahead.commit(following)
        return outputs

    def _resolve(self, step: InFlight) -> list[RequestOutput]:
        """Append a launched step's tokens; rows of sequences that stopped (or were aborted) while it
        was in flight are discarded."""
        tokens = step.read()
        live = [(seq, token) for seq, token in zip(step.seqs, tokens) if seq.status is SequenceStatus.RUNNING]
        seqs = [seq for seq, _ in live]
        finished = self._append_all(seqs, [token for _, token in live], [None] * len(live))
        self.lookahead.num_discarded += len(tokens) - len(live)
        self.metrics.generation_tokens += len(live)
        self.metrics.num_steps += 1
        return self._outputs(seqs if self.stream_outputs else [seqs[i] for i in finished])

    def _step_sync(self, batch: ScheduledBatch) -> list[RequestOutput]:
        if self.speculator is not None:
            return self._step_speculative(batch)
        sampling = [seq for seq, samples in zip(batch.seqs, batch.sampling) if samples]
        logits = self.runner.run(batch)
        graphs = self.runner.decode_graphs
        argmax = graphs.argmax if graphs is not None else None     # a decode graph's, else None
        self.scheduler.advance(batch)
        finished = self._sample_and_append(sampling, logits, argmax)
        self.metrics.num_steps += 1
        return self._outputs(batch.seqs if self.stream_outputs else finished)

    def _sample_and_append(self, sampling: list[Sequence], logits, argmax=None) -> list[Sequence]:
        """Fork requests with n > 1, sample the rows of `sampling`, append their tokens; the scheduled
        sequences that finished (children forked this step sit past the scheduled ones in `sampling` and
        are not part of the batch: offline, only requests one of whose scheduled sequences finished move)."""
        num_scheduled = len(sampling)
        forked = self._fork_all(sampling, logits)
        if forked is not logits:
            argmax, logits = None, forked
        tokens, logprobs = self._sample(logits, sampling, argmax) if sampling else ([], [])
        finished = self._append_all(sampling, tokens, logprobs)
        self.metrics.generation_tokens += len(tokens)
        return [sampling[i] for i in finished if i < num_scheduled]

    def _step_speculative(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """A step with drafts (serve/speculative/speculator.py): the sequences that do not speculate
        sample as in `_step_sync`; the others append their accepted tokens."""
        sampling, logits, drafts = self.speculator.run(batch)
        self.scheduler.advance(batch)
        finished = self._sample_and_append(sampling, logits)
        for draft in drafts:
            if self._append_draft(draft):
                finished.append(draft.seq)
        self.metrics.num_steps += 1
        return self._outputs(batch.seqs if self.stream_outputs else finished)

    def _append_draft(self, draft) -> bool:
        """Append a verified draft's accepted tokens up to a stop; True when the sequence finished."""
        seq = draft.seq
        if seq.is_finished:       # failed with a sibling
            return False
        try:
            tokens = self.speculator.accept(draft)
            self.speculator.record(draft, len(tokens) - 1)
            for token in tokens:
                self.metrics.generation_tokens += 1
                if self._append(seq, token, None):
                    return True
            self.speculator.settle(draft, len(tokens) - 1)
        except Exception as err:
            log.exception("request %s failed in accepting drafted tokens", seq.request_id)
            self._fail(seq.request_id, err)
        return False

    def _outputs(self, moved: list[Sequence]) -> list[RequestOutput]:
        """Outputs of the requests of `moved`, and of those failed this step."""
        request_ids = dict.fromkeys([*(seq.request_id for seq in moved), *self._failed])
        self._failed.clear()
        return [self._output(rid) for rid in request_ids if rid in self.requests]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], argmax) -> tuple[list, list]:
        """`sample`, and where the batch raises, each row alone: the rows that still raise fail their
        request (token None); the others go on (a seeded row may draw differently than in a clean batch)."""
        try:
            return sample(logits, seqs, argmax)
        except Exception:
            log.exception("sampling a batch of %d rows failed; sampling them one at a time", len(seqs))
        tokens, logprobs = [], []
        for row, seq in enumerate(seqs):
            if seq.is_finished:            # a sibling's row failed its request already
                tokens.append(None)
                logprobs.append(None)
                continue
            try:
                token, logprob = sample(logits[row:row + 1], [seq])
            except Exception as err:
                log.exception("request %s failed in sampling", seq.request_id)
                self._fail(seq.request_id, err)
                token, logprob = [None], [None]
            tokens += token
            logprobs += logprob
        return tokens, logprobs

    def _append_all(self, seqs: list[Sequence], tokens: list, logprobs: list) -> list[int]:
        """Append each row's token; the rows that finished. A row that raises fails its request alone."""
        finished = []
        for row, (seq, token, logprob) in enumerate(zip(seqs, tokens, logprobs)):
            if seq.is_finished:       # failed with a sibling, or its row could not be sampled
                continue
            try:
                if self._append(seq, token, logprob):
                    finished.append(row)
            except Exception as err:
                log.exception("request %s failed in appending a token", seq.request_id)
                self._fail(seq.request_id, err)
        return finished

    def _fork_all(self, sampling: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Fork the parents that just finished their prompt (children appended to `sampling`); the
        logits rows follow, since children share their parent's row. Decode steps return at once."""
        parents = [row for row, seq in enumerate(sampling) if not seq.forked]
        if not parents:
            return logits
        rows = list(range(len(sampling)))
        for row in parents:
            children = self._fork(sampling[row])
            sampling += children
            rows += [row] * len(children)
        return logits[rows]

    def _fork(self, parent: Sequence) -> list[Sequence]:
        children = self.scheduler.fork(parent)
        for child in children:
            self._init_seq(child)
        self.requests[parent.request_id] += children
        return children

    def _append(self, seq: Sequence, token: int, logprob: dict | None) -> bool:
        """Append the sampled token; True when it finishes the sequence."""
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if self.stream_outputs or seq.params.stop:
            seq.detokenizer.add(token)
        reason = self._finish_reason(seq, token)
        if reason is None:
            return False
        seq.detokenizer.add_all(seq.output_token_ids[seq.detokenizer.num_added:])
        self.scheduler.finish(seq, reason)
        self.metrics.finished += 1
        return True

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.stop_token_set:
            return "stop"
        if seq.params.stop and seq.num_output_tokens >= seq.params.min_tokens:
            text = seq.detokenizer.text
            for stop in seq.params.stop:
                index = text.find(stop, max(0, len(text) - 64 - len(stop)))
                if index >= 0:
                    seq.detokenizer.text = text[:index]
                    return "stop"
        return "length" if len(seq.token_ids) >= seq.max_num_tokens else None

    def _output(self, request_id: str) -> RequestOutput:
        seqs = sorted(self.requests[request_id], key=lambda s: s.sample_index)
        outputs = [CompletionOutput(s.sample_index, _visible_text(s), s.output_token_ids, s.finish_reason,
                                    s.logprobs) for s in seqs]
        error = self.errors.pop(request_id, None)
        finished = error is not None or (all(s.is_finished for s in seqs) and len(seqs) == seqs[0].params.n)
        if finished:
            del self.requests[request_id]
        return RequestOutput(request_id, seqs[0].token_ids[:seqs[0].num_prompt_tokens], outputs, finished, error)


def _visible_text(seq: Sequence) -> str:
    """Text that can be shown now: while running, hold back what might start a stop string."""
    text = seq.detokenizer.text
    if seq.is_finished or not seq.params.stop:
        return text
    return text[:max(0, len(text) - max(len(s) for s in seq.params.stop) + 1)]

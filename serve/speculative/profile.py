"""Start-up timing of draft and target forwards: the points of goodput.py's BatchTimeModel.

`measure` times eager forwards (draft and verify passes of steps off the graphs), `measure_graphs` the
graph replays that steps on graphs run (serve/speculative/graph_passes.py: the draft's decode step, the
target's verify step per query length), `measure_decode` the target's own decode step (CUDA graphs on
the GPU), the cost of a step that drafts nothing. Each point is a forward of `num_tokens` tokens spread
over min(num_tokens, max_num_seqs) placeholder sequences that share one block table (their KV is garbage
written before any request arrives), timed after a warm-up, the device synchronised around it.
"""

from __future__ import annotations

import math
import time

import torch

from serve.model_runner import Span
from serve.sampling_params import SamplingParams
from serve.scheduler import ScheduledBatch
from serve.sequence import Sequence
from serve.speculative.goodput import BatchTimeModel

REPEATS = 3


def profile_points(max_num_seqs: int, max_tokens: int) -> list[int]:
    """1, 4, 16, ... up to the step's token budget."""
    points, n = [], 1
    while n <= max_tokens:
        points.append(n)
        n *= 4
    return points


def _spans(runner, num_tokens: int, max_num_seqs: int) -> list[Span]:
    num_seqs = min(num_tokens, max_num_seqs)
    per_seq = math.ceil(num_tokens / num_seqs)
    table = list(range(math.ceil(per_seq / runner.config.block_size)))
    name = runner.table_key or (lambda key: key)
    spans = []
    for i in range(num_seqs):
        seq = Sequence(f"profile-{i}", [0] * per_seq, SamplingParams(max_tokens=1))
        seq.block_tables = {name(key): table for key in runner.block_plan}
        spans.append(Span(seq, 0, seq.token_ids, 1))
    return spans


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_batch(runner, num_seqs: int) -> ScheduledBatch:
    """A pure decode step of `num_seqs` placeholder sequences (what runner.run sends to its decode graphs)."""
    batch = ScheduledBatch(max_num_new_tokens=1, num_sampling=num_seqs)
    for span in _spans(runner, num_seqs, num_seqs):
        batch.seqs.append(span.seq)
        batch.num_new_tokens.append(1)
        batch.sampling.append(True)
    return batch


def time_call(device, fn) -> float:
    fn()                        # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(REPEATS):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / REPEATS


def measure(runner, max_num_seqs: int, max_tokens: int) -> BatchTimeModel:
    """Forwards of any query lengths (draft passes, verify passes): run_spans, eager."""
    points = {}
    for n in profile_points(max_num_seqs, max_tokens):
        spans = _spans(runner, n, max_num_seqs)
        points[n] = time_call(runner.device, lambda: runner.run_spans(spans))     # noqa: B023 - called at once
    return BatchTimeModel(points)


def measure_decode(runner, max_num_seqs: int) -> BatchTimeModel:
    """The target's own decode steps (its decode graphs where it has them): a step that drafts nothing."""
    points = {}
    for n in profile_points(max_num_seqs, max_num_seqs):
        batch = _decode_batch(runner, n)
        points[n] = time_call(runner.device, lambda: runner.run(batch))          # noqa: B023 - called at once
    return BatchTimeModel(points)


def measure_graphs(runner, graphs, query_lens) -> BatchTimeModel:
    """Steps of `graphs` (a runner's DecodeGraphs) of n rows of q tokens, n = 1, 4, ... up to the graphs'
    batch and q in `query_lens`: points at n * q tokens (the mean where two shapes meet)."""
    times: dict[int, list[float]] = {}
    for n in sorted({*profile_points(graphs.max_batch, graphs.max_batch), graphs.max_batch}):
        for q in query_lens:
            spans = _spans(runner, n * q, n)
            seconds = time_call(runner.device, lambda: graphs.run_spans(spans, q))     # noqa: B023 - called at once
            times.setdefault(n * q, []).append(seconds)
    return BatchTimeModel({n: sum(t) / len(t) for n, t in times.items()})

"""Start-up timing of draft and target forwards: the points of goodput.py's BatchTimeModel.

Each point is a forward of `num_tokens` tokens spread over min(num_tokens, max_num_seqs) placeholder
sequences that share one block table (their KV is garbage written before any request arrives), timed
after a warm-up, the device synchronised around it.
"""

from __future__ import annotations

import math
import time

import torch

from serve.model_runner import Span
from serve.sampling_params import SamplingParams
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


def time_forward(runner, spans: list[Span]) -> float:
    runner.run_spans(spans)     # warm-up
    _sync(runner.device)
    start = time.perf_counter()
    for _ in range(REPEATS):
        runner.run_spans(spans)
    _sync(runner.device)
    return (time.perf_counter() - start) / REPEATS


def measure(runner, max_num_seqs: int, max_tokens: int) -> BatchTimeModel:
    return BatchTimeModel({n: time_forward(runner, _spans(runner, n, max_num_seqs))
                           for n in profile_points(max_num_seqs, max_tokens)})


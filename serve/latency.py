"""Per-request latency: time to first token (TTFT), time per output token after it (TPOT), end to end.

`RequestTimer` follows one request's outputs as the async engine hands them over (serve/async_engine.py)
and, when it finishes normally, adds its three figures to the engine's `Histogram`s, which
serve/metrics.py renders in Prometheus' histogram format (cumulative `_bucket{le=...}`, `_sum`,
`_count`). Aborted and failed requests are not counted. Times are seconds of `time.perf_counter`,
from the request's arrival at the engine (after parsing and tokenization) to the step that produced
the token.
"""

from __future__ import annotations

import bisect
import time

from serve.outputs import RequestOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help_text, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)      # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts):
            total += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {total}"]
        return "\n".join(lines) + "\n"


class LatencyHistograms:
    def __init__(self):
        self.ttft = Histogram("serve_time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.tpot = Histogram("serve_time_per_output_token_seconds", "Time per output token after the first.",
                              TPOT_BUCKETS)
        self.e2e = Histogram("serve_e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS)

    def render(self) -> str:
        return self.ttft.render() + self.tpot.render() + self.e2e.render()


class RequestTimer:
    def __init__(self):
        self.arrival = time.perf_counter()
        self.first_token: float | None = None

    def observe(self, output: RequestOutput, histograms: LatencyHistograms) -> None:
        now = time.perf_counter()
        num_tokens = max((len(o.token_ids) for o in output.outputs), default=0)
        if self.first_token is None and num_tokens:
            self.first_token = now
        if not output.finished or output.error or self.first_token is None:
            return
        if any(o.finish_reason == "abort" for o in output.outputs):
            return
        histograms.ttft.observe(self.first_token - self.arrival)
        histograms.e2e.observe(now - self.arrival)
        if num_tokens > 1:
            histograms.tpot.observe((now - self.first_token) / (num_tokens - 1))

"""Serving counters and their Prometheus text exposition (GET /metrics).

Counters accumulate in the engine; gauges (running/waiting requests, KV blocks) are read from the
scheduler and block manager when the page is rendered; the latency histograms (TTFT, TPOT, end to end)
are filled by the async engine (serve/latency.py). With a draft model, the speculation counters
(serve/speculative/speculator.py SpecStats) follow: drafted and accepted tokens, their ratio, the mean
tokens per verify, the steps that chose each speculation length, and the verifying steps whose passes
all ran on CUDA graphs or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.latency import LatencyHistograms


@dataclass
class Metrics:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    num_steps: int = 0
    failed: int = 0             # requests failed by an error of their own (the others kept running)
    latency: LatencyHistograms = field(default_factory=LatencyHistograms)


def _line(name: str, kind: str, help_text: str, value) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n{name} {value}\n"


def render(engine) -> str:
    """Prometheus text format (version 0.0.4) of the engine's state."""
    scheduler, blocks, m = engine.scheduler, engine.block_manager, engine.metrics
    rows = [
        ("serve_requests_running", "gauge", "Sequences in the running batch.", len(scheduler.running)),
        ("serve_requests_waiting", "gauge", "Sequences waiting to be scheduled.", len(scheduler.waiting)),
        ("serve_kv_blocks_used", "gauge", "KV cache blocks in use (all groups).", blocks.num_used_blocks()),
        ("serve_kv_blocks_total", "gauge", "KV cache blocks (all groups).", blocks.num_total_blocks()),
        ("serve_kv_cache_tokens", "gauge", "Tokens the KV cache of the full-attention layers holds (else of the "
         "widest window).", engine.kv_cache_tokens),
        ("serve_cuda_graphs_captured", "gauge", "Decode batch sizes captured as CUDA graphs; 0: decode runs "
         "eagerly (see the start-up log for why).", engine.runner.num_graphs),
        ("serve_prompt_tokens_total", "counter", "Prompt tokens received.", m.prompt_tokens),
        ("serve_generation_tokens_total", "counter", "Tokens generated.", m.generation_tokens),
        ("serve_sequences_finished_total", "counter", "Sequences finished.", m.finished),
        ("serve_requests_aborted_total", "counter", "Requests aborted (client gone or cancelled).", m.aborted),
        ("serve_preemptions_total", "counter", "Sequences preempted for recomputation.", scheduler.num_preemptions),
        ("serve_prefix_cache_hit_tokens_total", "counter", "Prompt tokens read from the prefix cache.",
         scheduler.num_cached_tokens),
        ("serve_engine_steps_total", "counter", "Engine steps run.", m.num_steps),
        ("serve_requests_failed_total", "counter", "Requests failed by an error of their own.", m.failed),
    ]
    text = "".join(_line(*row) for row in rows) + m.latency.render()
    return text if engine.speculator is None else text + _speculation(engine.speculator.stats)


def _speculation(stats) -> str:
    rows = [
        ("serve_spec_draft_tokens_total", "counter", "Tokens the draft proposed.", stats.num_drafted),
        ("serve_spec_accepted_tokens_total", "counter", "Drafted tokens the target accepted.", stats.num_accepted),
        ("serve_spec_acceptance_rate", "gauge", "Accepted over drafted tokens.", f"{stats.acceptance_rate:.6f}"),
        ("serve_spec_mean_accepted_length", "gauge", "Tokens per speculating sequence and step (accepted + 1).",
         f"{stats.mean_accepted_length:.6f}"),
        ("serve_spec_graph_steps_total", "counter", "Verifying steps whose draft and verify passes ran on graphs.",
         stats.num_graph_steps),
        ("serve_spec_eager_steps_total", "counter", "Verifying steps with a pass run eagerly.", stats.num_eager_steps),
    ]
    name = "serve_spec_steps_by_length_total"
    lengths = "".join(f'{name}{{length="{k}"}} {n}\n' for k, n in sorted(stats.chosen.items()))
    header = f"# HELP {name} Engine steps by the speculation length chosen.\n# TYPE {name} counter\n"
    return "".join(_line(*row) for row in rows) + header + lengths

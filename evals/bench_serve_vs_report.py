"""The runtime against vLLM in the report of evals/bench_serve.py (`--compare vllm`): per workload both
systems' offline rows in one table with the ratio of output tok/s; the batch-1 step of each; the
online percentiles of each at every request rate; and what vLLM chose (attention backend, KV cache).
"""

from __future__ import annotations

_NAN = float("nan")


def _rate(row: dict, key: str) -> float:
    return row[key] / row["seconds"] if row.get("seconds") else _NAN


def _offline_lines(rows: list[dict], peer: str = "vLLM") -> list[str]:
    ratio_head = f"serve / {peer} (output / total)" if peer else ""
    lines = [f"| workload | system | requests | seconds | output tok/s | total tok/s | {ratio_head} | KV tokens |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ours = {r["workload"]: r for r in rows if r["system"] == "serve" and "error" not in r}
    peer = {r["workload"]: r for r in rows if r["system"] == "vLLM" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r.get('name', r['system'])} | {r['error']} | | | | | |")
            continue
        ratio, total = "", (r["prompt_tokens"] + r["output_tokens"]) / r["seconds"]
        if r["workload"] in ours and r["workload"] in peer and r["system"] == "serve":
            theirs = peer[r["workload"]]
            their_total = (theirs["prompt_tokens"] + theirs["output_tokens"]) / theirs["seconds"]
            ratio = f"**{_rate(r, 'output_tokens') / _rate(theirs, 'output_tokens'):.2f}x** / {total / their_total:.2f}x"
        kv = r.get("kv_tokens", r.get("kv_cache_tokens"))
        lines.append(f"| {r['workload']} | {r['name']} | {r['requests']} | {r['seconds']:.2f} | "
                     f"{_rate(r, 'output_tokens'):,.0f} | {total:,.0f} | {ratio} | {'' if kv is None else f'{kv:,}'} |")
    return lines


def _chosen_lines(rows: list[dict]) -> list[str]:
    """What vLLM decided at start-up, per run."""
    lines = []
    for r in rows:
        if r["system"] == "vLLM" and "error" not in r:
            backend = r.get("attention_backend") or r.get("attention_backend_selected") or "not in its log"
            lines.append(f"- {r['workload']}: {r['name']}, attention {backend} (FlashAttention version "
                         f"{r.get('flash_attn_version')}), {r.get('num_gpu_blocks')} KV blocks of {r.get('block_size')} "
                         f"tokens, CUDA graphs {r.get('cudagraph_mode')}, chunked prefill {r.get('chunked_prefill')}, "
                         f"start-up {r.get('init_s', _NAN):.0f} s with {r.get('free_gb_at_start', _NAN):.1f} GB free")
    return lines


def _latency_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "### Batch-1 decode step (one sequence)", "",
             ("serve: the median engine step; vLLM: (time of N output tokens - time of 1) / (N - 1) through"
             " `LLM.generate`, best of 3 each."), "",
             "| model | system | context | step (ms) |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['system']} | {r['context']} | {r['step_ms']:.3f} |" for r in rows]
    return lines


def _online_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "### Online (Poisson arrivals, streaming over each system's OpenAI server; ms)", "",
             ("| model | rate (req/s) | system | requests | TTFT p50 / p90 / p99 | TPOT p50 / p90 / p99 |"
             " ITL p50 / p90 / p99 |"), "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["rate"], r["system"] != "serve")):
        if "error" in r:
            lines.append(f"| {r['model']} | {r['rate']} | {r['system']} | {r['error']} | | | |")
            continue
        cells = [" / ".join(f"{r[m].get(q, _NAN):.1f}" for q in ("p50", "p90", "p99"))
                 for m in ("ttft_ms", "tpot_ms", "itl_ms")]
        lines.append(f"| {r['model']} | {r['rate']} | {r['system']} | {r['requests']} | " + " | ".join(cells) + " |")
    return lines


def vs_lines(results: dict) -> list[str]:
    if "peer" not in results:
        rows = results.get("vs", [])
        return ["", "## More workloads", ""] + _offline_lines(rows, peer="") if rows else []
    peer = results["peer"]
    head = (f"vLLM {peer['version']}" if peer.get("version") else f"vLLM not run: {peer['reason']}")
    lines = ["", "## Against vLLM (same checkpoint, prompts and limits; each system alone on the GPU in turn)", "",
             f"{head}. Greedy, EOS ignored, prefix caching off in both; vLLM's defaults otherwise.", ""]
    lines += _offline_lines(results.get("vs", []))
    chosen = _chosen_lines(results.get("vs", []))
    if chosen:
        lines += ["", "What vLLM chose:", ""] + chosen
    return lines + _latency_lines(results.get("vs_latency", [])) + _online_lines(results.get("vs_online", []))

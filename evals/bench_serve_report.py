"""Markdown report of evals/bench_serve.py: one table per mode, ratios against the first row, the command;
the grid of a model against its slimmed sibling (per mix and context length, with each engine's decode
mode), the fresh `compress serve` start-ups, and the rows against vLLM (bench_serve_vs_report).

Also writes the raw results as JSON next to the markdown (same stem, .json).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench_serve_vs_report import vs_lines


def _rate(row: dict, key: str) -> float:
    return row[key] / row["seconds"] if row.get("seconds") else float("nan")


def _throughput_rows(rows: list[dict], base: dict | None) -> list[str]:
    lines = ["| run | requests | seconds | requests/s | output tok/s | total tok/s | vs first row | decode graphs |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | failed: {row['error']} | | | | | | |")
            continue
        out = _rate(row, "output_tokens")
        total = (row["prompt_tokens"] + row["output_tokens"]) / row["seconds"]
        ratio = out / _rate(base, "output_tokens") if base else 1.0
        lines.append(f"| {row['name']} | {row['requests']} | {row['seconds']:.2f} | {row['requests'] / row['seconds']:.2f}"
                     f" | {out:,.0f} | {total:,.0f} | {ratio:.2f}x | {row.get('graphs', '')} |")
    return lines


def _grid_lines(results: dict) -> list[str]:
    """Slimmed sibling against its parent per (mix, context length); the main run's pair first."""
    args, offline, rows = results["args"], results["offline"], list(results.get("grid", []))
    if len(offline) > 1 and "slimmed" in offline[1]["name"] and "error" not in offline[1]:
        rows.insert(0, {"model": offline[0]["name"], "max_model_len": args["max_model_len"],
                        "mix": f"{args['min_prompt']}-{args['max_prompt']} -> {args['output_len']}",
                        "parent": offline[0], "slim": offline[1]})
    if not rows:
        return []
    lines = ["", "## Slimmed sibling against its parent (same prompts, same run)", "",
             "| model | prompt tokens -> output | max_model_len | parent output tok/s | slimmed output tok/s |"
             " slimmed / parent | decode graphs (parent / slimmed) | KV tokens (parent / slimmed) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "parent" not in r or "slim" not in r:
            lines.append(f"| {r['model']} | {r['mix']} | {r['max_model_len']} | failed (see below) | | | | |")
            continue
        parent, slim = _rate(r["parent"], "output_tokens"), _rate(r["slim"], "output_tokens")
        lines.append(f"| {r['model']} | {r['mix']} | {r['max_model_len']} | {parent:,.0f} | {slim:,.0f} | "
                     f"**{slim / parent:.2f}x** | {r['parent'].get('graphs')} / {r['slim'].get('graphs')} | "
                     f"{r['parent'].get('kv_tokens', 0):,} / {r['slim'].get('kv_tokens', 0):,} |")
    return lines


def _serve_check_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Fresh `compress serve` start-ups (health, one completion, /metrics, start-up log)", "",
             "| model | max_model_len | start-up (s) | /health | completion tokens | decode graphs | KV tokens |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['max_model_len']} | {r['startup_s']:.1f} | {r.get('health')} | "
                     f"{r.get('completion_tokens')} | {r.get('graphs')} | {r.get('kv_tokens', 0):,} |")
    for r in rows:
        lines += ["", f"Start-up log at max_model_len {r['max_model_len']}:", ""] + [f"    {line}" for line in r["log"]]
    return lines


def _hf_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    ours = rows[0]
    lines = ["", "## Against Hugging Face (same prompts, same run)", ""] + _throughput_rows(rows, None)
    lines.append("")
    for row in rows[1:]:
        if "error" not in row and row.get("output_tokens"):
            ratio = _rate(ours, "output_tokens") / _rate(row, "output_tokens")
            lines.append(f"- serve / {row['name']}: **{ratio:.1f}x** output tokens/s")
    return lines


def _latency_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Batch-1 decode against its bandwidth floor", "",
             "| model | context | weights (GB) | KV read (MB) | floor (ms) | graph replay (ms) | replay / floor |"
             " engine step (ms) | step / floor |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['context']} | {r['weight_gb']:.2f} | {r['kv_mb']:.1f} | {r['floor_ms']:.3f}"
                     f" | {r['replay_ms']:.3f} | {r['replay_ms'] / r['floor_ms']:.2f}x | {r['step_ms']:.3f}"
                     f" | {r['step_ms'] / r['floor_ms']:.2f}x |")
    return lines


def _online_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Online (Poisson arrivals, streaming over HTTP)", "",
             "| model | rate (req/s) | requests | metric | mean (ms) | p50 (ms) | p90 (ms) | p99 (ms) |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        for metric in ("ttft_ms", "tpot_ms", "itl_ms"):
            s = r[metric]
            lines.append(f"| {r['model']} | {r['rate']} | {r['requests']} | {metric[:-3].upper()} | {s['mean']:.1f}"
                         f" | {s['p50']:.1f} | {s.get('p90', float('nan')):.1f} | {s['p99']:.1f} |")
    return lines


def render(results: dict) -> str:
    offline = results["offline"]
    lines = [f"# Serving benchmark on {results['device']}", "",
             f"torch {results['torch']}; device-to-device copy {results['copy_gbs']:.0f} GB/s (read + write).", "",
             f"Command: `{results['command']}`", "", "## Offline throughput", ""]
    lines += _throughput_rows(offline, offline[0] if offline else None)
    lines += _grid_lines(results) + _serve_check_lines(results.get("serve_check", []))
    lines += _hf_lines(results["hf"]) + _latency_lines(results["latency"]) + _online_lines(results["online"])
    lines += vs_lines(results)
    if results.get("errors"):
        lines += ["", "## Failed steps", ""] + [f"- {e}" for e in results["errors"]]
    return "\n".join(lines) + "\n"


def write_report(results: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(results))
    path.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))

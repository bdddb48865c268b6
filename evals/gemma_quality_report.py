"""The markdown of evals/gemma_quality.py: the table, the issue's targets met or missed, stability, continuations."""

from __future__ import annotations

from pathlib import Path

WIKI = "wikipedia (held-out articles)"
TARGETS = ((0.8, False, 1.5), (0.8, True, 1.15), (0.5, True, 1.5))  # (FLOPs, distilled, max ppl / dense)


def write_markdown(result: dict, path: Path) -> None:
    rows = result["rows"]
    lines = [f"# Slimmed {result['settings']['model']}: quality by importance method, FLOPs and distillation", "",
             f"Command: `{result['command']}`", "", _setup(result), "", *_table(result), ""]
    if rows[1:]:
        lines += ["## Targets (issue #32)", "", *_targets(result), ""]
    if result["stability"]:
        lines += ["## Stability of the selection", "",
                  "Share of the units kept from the first calibration draw that a second draw (seed + 1) also keeps "
                  "(search and rearrangement, before tuning).", "",
                  "| FLOPs | method | heads | filters |", "|---|---|---|---|"]
        lines += [f"| {s['flops']} | {s['method']} | {s['heads']:.1%} | {s['filters']:.1%} |"
                  for s in result["stability"]]
        lines.append("")
    lines += ["## Greedy continuations", "", *_continuations(rows)]
    path.write_text("\n".join(lines) + "\n")


def _setup(result: dict) -> str:
    s, c = result["settings"], result.get("calib_config", {})
    state = "complete" if result.get("complete") else result.get("stopped", "run in progress or interrupted")
    return (f"Device: {result.get('device', '?')}. Calibration: {result.get('calibration', '?')}, "
            f"{c.get('num_samples')} windows of {c.get('seq_len')} tokens. FLOPs: of the non-embedding FLOPs at "
            f"context {s['context_len']}. Every pruned model: GQA-shaped search, rearrangement (Fisher methods), "
            f"least-squares tuning, slimming. Distillation: KL to the dense parent, lr {s['lr']}, on "
            f"{result.get('distill_text', '?')} ({result.get('distill_sampled_windows', 0)} windows sampled by the "
            f"teacher), the same windows for every run. Held-out text: BOS + {s['ppl_seq_len'] - 1} tokens per "
            f"window, at most {s['ppl_max_windows']} windows per text; agreement and KL with the parent on the "
            f"Wikipedia tail. Prune seconds: scoring (once per method, shared by all FLOPs) + search, "
            f"rearrangement, tuning and slimming. Run: {state}, {result.get('seconds', 0):.0f} s in all.")


def _table(result: dict) -> list[str]:
    rows = sorted(result["rows"], key=lambda r: (-r["flops"], r["method"], r["tokens"]))
    sets = list(result["rows"][0]["perplexity"])
    dense = result["rows"][0]["perplexity"]
    head = "| FLOPs | method | distilled tokens | " + " | ".join(f"ppl {n} | x dense" for n in sets)
    lines = [head + " | agreement | KL | q / kv heads | filters | prune s | distill s |",
             "|---" * (9 + 2 * len(sets)) + "|"]
    score = result.get("score_seconds", {})
    for r in rows:
        ppl = " | ".join(f"{r['perplexity'][n]:.2f} | {r['perplexity'][n] / dense[n]:.2f}" for n in sets)
        if r["method"] == "dense":
            lines.append(f"| 1.0 | dense | | {ppl} | 100% | 0 | | | | |")
            continue
        prune_s = score.get(r["method"], 0) + r["prune_seconds"]
        lines.append(f"| {r['flops']} | {r['method']} | {r['tokens']:,} | {ppl} | {r['agreement']:.1%} | "
                     f"{r['kl']:.3f} | {sum(r['num_attention_heads_per_layer'])} / "
                     f"{sum(r['num_key_value_heads_per_layer'])} | {sum(r['intermediate_size_per_layer'])} | "
                     f"{prune_s:.1f} | {r.get('distill_seconds', 0):.1f} |")
    return lines


def _targets(result: dict) -> list[str]:
    rows, dense = result["rows"][1:], result["rows"][0]["perplexity"][WIKI]
    lines = []
    for flops, distilled, limit in TARGETS:
        cells = [r for r in rows
                 if r["flops"] == flops and (r["tokens"] > 0) == distilled and r["method"] != "activation"]
        if not cells:
            lines.append(f"- FLOPs {flops}, {'distilled' if distilled else 'no training'}: not run")
            continue
        best = min(cells, key=lambda r: r["perplexity"][WIKI])
        ratio = best["perplexity"][WIKI] / dense
        verdict = "met" if ratio <= limit else f"missed by {ratio / limit - 1:.0%}"
        how = f"{best['tokens']:,} tokens in {best['distill_seconds']:.0f} s" if distilled else "no training"
        lines.append(f"- FLOPs {flops}, {'distilled' if distilled else 'no training'}: best {ratio:.2f}x the dense "
                     f"Wikipedia perplexity ({best['method']}, {how}); target {limit}x: {verdict}")
    lines.append("- Ahead of the activation baseline at the same FLOPs and recovery: " + _versus_activation(rows))
    return lines


def _versus_activation(rows: list[dict]) -> str:
    base = {(r["flops"], r["tokens"]): r["perplexity"][WIKI] for r in rows if r["method"] == "activation"}
    behind = [f"{r['method']} @ {r['flops']}/{r['tokens']:,}" for r in rows
              if r["method"] != "activation" and (r["flops"], r["tokens"]) in base
              and r["perplexity"][WIKI] >= base[(r["flops"], r["tokens"])]]
    compared = sum(1 for r in rows if r["method"] != "activation" and (r["flops"], r["tokens"]) in base)
    return f"{compared - len(behind)} of {compared} rows" + (f"; behind: {', '.join(behind)}" if behind else "")


def _continuations(rows: list[dict]) -> list[str]:
    from evals.gemma_pruning import PROMPTS

    lines = []
    for i, prompt in enumerate(PROMPTS):
        lines += [f"**{prompt}**", ""]
        for r in sorted(rows, key=lambda r: (-r["flops"], r["method"], r["tokens"])):
            if "continuations" in r:
                text = r["continuations"][i].replace("\n", " ").replace("|", "/")
                lines.append(f"- {r['method']} @ {r['flops']}, {r['tokens']:,} tokens: {text}")
        lines.append("")
    return lines

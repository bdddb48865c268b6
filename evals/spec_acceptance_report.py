"""The markdown of evals/spec_acceptance.py: the children, then acceptance and time per (child, K)."""

from __future__ import annotations

from pathlib import Path


def write_markdown(result: dict, path: Path) -> None:
    lines = [f"# Speculative decoding of {result['settings']['model']} drafted by its slimmed children", "",
             f"Command: `{result['command']}`", "", _setup(result), "", "## Children", "", *_children(result), ""]
    if "no_draft" in result:
        lines += ["## Speculative decoding in the runtime", "", *_runs(result), ""]
    lines += ["## Progress", "", *[f"    {line}" for line in result["progress"]]]
    path.write_text("\n".join(lines) + "\n")


def _setup(result: dict) -> str:
    s = result["settings"]
    state = "complete" if result.get("complete") else "run in progress or interrupted"
    return (f"Device: {result.get('device', '?')}. Calibration: {result.get('calibration', '?')}, {s['num_samples']} "
            f"windows of {s['seq_len']} tokens. Children: `drop:N` removes N whole layers by {s['depth_method']}, "
            f"`flops:F` keeps FLOPs fraction F by {s['width_method']}; each distilled from the parent for "
            f"{s['distill_tokens']:,} tokens (KL, lr {s['lr']}, on {result.get('distill_text', '?')}). Agreement: "
            f"top-1 agreement with the parent on {s['eval_windows']} held-out Wikipedia windows of "
            f"{s['eval_seq_len']} tokens. Runtime: {s['num_prompts']} prompts of {s['prompt_len']} tokens from the "
            f"held-out Wikipedia articles, {s['output_len']} output tokens each, greedy, EOS ignored, prefix caching "
            f"off; batch: all prompts at once; batch 1: {s['timing_prompts']} prompts one at a time. Per-token "
            f"acceptance: the p at which independent per-token acceptance gives the measured rate at that K "
            f"(what `evals/bench_spec.py --acceptance` replays). Run: {state}, {result.get('seconds', 0):.0f} s.")


def _children(result: dict) -> list[str]:
    t = result.get("target")
    lines = ["| model | layers | heads / kv | filters | params (non-embedding) | agreement pruned | agreement "
             "distilled | KL distilled | ppl distilled | prune s | distill s |", "|---" * 11 + "|"]
    if t:
        lines.append(f"| parent | {t['layers']} | {t['heads']} / {t['kv_heads']} | {t['filters']:,} | "
                     f"{t['params'] / 1e6:.1f}M ({t['non_embedding_params'] / 1e6:.1f}M) | 100% | | | | | |")
    for c in result["children"]:
        d = c.get("distilled", {})
        lines.append(f"| {c['name']} | {c['layers']} | {c['heads']} / {c['kv_heads']} | {c['filters']:,} | "
                     f"{c['params'] / 1e6:.1f}M ({c['non_embedding_params'] / 1e6:.1f}M) | "
                     f"{c['pruned']['agreement']:.1%} | {_pct(d.get('agreement'))} | {_num(d.get('kl'), 3)} | "
                     f"{_num(d.get('perplexity'), 2)} | {c['prune_seconds']} | {c.get('distill_seconds', '')} |")
    dropped = [f"{c['name']}: layers {c['dropped_layers']}" for c in result["children"] if "dropped_layers" in c]
    if dropped:
        lines += ["", "Dropped layers: " + "; ".join(dropped) + "."]
    return lines


def _runs(result: dict) -> list[str]:
    base = result["no_draft"]
    lines = ["| draft | K | acceptance | per-token acceptance | tokens / verify | batch ms/token | batch-1 ms/token | "
             "batch-1 speedup | batch-1 draft / verify ms per token | greedy = no draft | first differences |",
             "|---" * 11 + "|",
             f"| none | | | | | {base['batch_ms_per_token']:.2f} | {base['batch1_ms_per_token']:.2f} | 1.00 | | | |"]
    for c in result["children"]:
        for k, r in c.get("runs", {}).items():
            g = r["greedy"]
            split = f"{_num(r.get('batch1_draft_ms_per_token'), 2)} / {_num(r.get('batch1_verify_ms_per_token'), 2)}"
            lines.append(f"| {c['name']} | {k} | {r['acceptance']:.1%} | {_num(r.get('per_token_acceptance'), 3)} | "
                         f"{r['mean_accepted_length']:.2f} | {r['batch_ms_per_token']:.2f} | "
                         f"{r['batch1_ms_per_token']:.2f} | {base['batch1_ms_per_token'] / r['batch1_ms_per_token']:.2f} | "
                         f"{split} | {g['equal']}/{g['of']} | {_positions(g['first_differences'])} |")
    return lines


def _positions(first: list[int]) -> str:
    return ", ".join(map(str, sorted(first)[:8])) + (" ..." if len(first) > 8 else "")


def _pct(value) -> str:
    return "" if value is None else f"{value:.1%}"


def _num(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"

"""Render the glue_pruning results (from evals/glue_pruning.py) as Markdown, JSON and a plot."""

from __future__ import annotations

import json
from pathlib import Path


def _metric(values: dict) -> str:
    return "/".join(f"{v:.1f}" for k, v in values.items() if k != "num_examples")


def _speed(row, key):
    value = row["speedup"].get(key)
    return f"{value:.2f}x" if value else "-"


def markdown(result: dict) -> str:
    lines = ["# GLUE pruning: Fisher post-training pruning vs baselines", "",
             f"Regenerate: `{result['command']}`", "",
             "Devices: " + ", ".join(f"{k} = {v}" for k, v in result["devices"].items()), "",
             "Metrics in percent (several separated by /: MRPC acc/F1, STS-B Pearson/Spearman). Baselines keep the "
             "same FLOPs with a uniform per-layer ratio (no rearrangement, no tuning), slimmed the same way. "
             f"Speedup = dense latency / slimmed latency at sequence length {result.get('latency_seq', 128)}.", ""]
    keys = sorted({k for r in result["rows"] for k in r["speedup"]})
    header = "| model | task | FLOPs | dense | fisher | magnitude | random | fisher prune s | " + " | ".join(
        f"speedup {k}" for k in keys) + " |"
    lines += [header, "|" + "---|" * (8 + len(keys))]
    for (model, task, flops), group in _grouped(result["rows"]).items():
        fisher = group.get("fisher")
        cells = [model, task, f"{flops:g}", _metric(next(iter(group.values()))["dense"])]
        cells += [_metric(group[m]["metrics"]) if m in group else "-" for m in ("fisher", "magnitude", "random")]
        cells.append(f"{fisher['prune']['seconds']['total']:.1f}" if fisher and fisher.get("prune") else "-")
        cells += [_speed(fisher, k) if fisher else "-" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Seconds per pruning phase (fisher):", ""]
    for (model, task, flops), group in _grouped(result["rows"]).items():
        if "fisher" in group and group["fisher"].get("prune"):
            phases = group["fisher"]["prune"]["seconds"]
            lines.append(f"- {model} {task} FLOPs {flops:g}: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    return "\n".join(lines) + "\n"


def _grouped(rows):
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["task"], r["flops"]), {})[r["method"]] = r
    return groups


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({(r["model"], r["task"]) for r in result["rows"]})
    models = list(dict.fromkeys(m for m, _ in pairs)) or [None]
    ncols = max(sum(m == model for m, _ in pairs) for model in models) if pairs else 1
    fig, axes = plt.subplots(len(models), ncols, figsize=(4 * ncols, 3.2 * len(models)), squeeze=False)
    slots = [axes[models.index(m)][[p for p in pairs if p[0] == m].index((m, t))] for m, t in pairs]
    for ax, (model, task) in zip(slots, pairs):
        rows = [r for r in result["rows"] if r["model"] == model and r["task"] == task]
        first = lambda m: next(v for k, v in m.items() if k != "num_examples")  # noqa: E731
        ax.axhline(first(rows[0]["dense"]), color="gray", linestyle="--", label="dense")
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["flops"], first(r["metrics"])) for r in rows if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(title=f"{model} {task}", xlabel="FLOPs kept", ylabel="dev metric (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}.md, .json, .png")

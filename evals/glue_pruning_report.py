"""Render results as Markdown: the GLUE pruning table (evals/glue_pruning.py, + JSON and a plot) and the
encoder latency table (evals/encoder_latency.py).

The GLUE table's speedup columns come from evals/results/encoder_latency.json when it exists (or from
the file named by $ENCODER_LATENCY): shape-matched random-weight models timed with CUDA graphs in bf16
and on CPU in fp32, medians. Without it they are glue_pruning.py's own eager timings, launch-bound on
the GPU at this model size, and the Markdown says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LATENCY_JSON = Path(__file__).parent / "results" / "encoder_latency.json"
# Rounds of latency-budgeted pruning (evals/latency_search_report.py), summarized under the table.
LATENCY_SEARCH_JSONS = [Path(__file__).parent / "results" / f"latency_search{s}.json" for s in ("", "_minilm")]

# How the numbers in the committed evals/results/glue_pruning_state.json were made; printed above a
# table rendered from it (--report-only).
HISTORY = """How these numbers were made (H100 machine, 2026-11-24): five 10-minute calls in one machine
hold, so every dense model and its pruned children come from the same fine-tune (the script resumes
from `--work/state.json`; the fourth call stopped inside MPNet SST-2 and the fifth finished it):

    # calls 1-5 on the GPU machine: minilm with TASKS "sst2 mrpc", "stsb rte";
    # mpnet-base with "mrpc rte", "stsb sst2", "sst2"
    python evals/glue_pruning.py --models MODEL --tasks TASKS --flops 0.4 0.5 0.6 0.7 \\
        --methods fisher magnitude random --data-dir DATA --work /tmp/gp3 --latency-devices cuda --latency-reps 2
    # this table, from the saved numbers (committed as glue_pruning_state.json)
    mkdir -p /tmp/gp3 && cp evals/results/glue_pruning_state.json /tmp/gp3/state.json
    {command}

Fine-tuning: 3 epochs, lr 5e-5, batch 32, max length 128, seed 0 (one seed: RTE and MRPC dev sets are
small, so differences of a point are within seed noise; glue_pruning_weights.md has four more draws at
FLOPs 0.5 and 0.6). Calibration: 2,048 training examples. Tuning: compress prune's default, the weights
of each layer's output projections (`--tune-weights`). The paper's mask tuning (`--no-tune-weights`)
on an earlier fine-tune, with the same baselines: glue_pruning_masks.md."""

EAGER_CAVEAT = """**Caveat on the cuda columns:** latency is the mean of `--latency-reps` (10 here) eager Hugging Face
forwards (bf16 autocast) after 3 warm-ups. At batch 32 x 128 tokens MiniLM does ~0.1 TFLOP, a fraction
of a millisecond of H100 work, so its forward is bound by kernel launches and Python, and the cuda
speedups for MiniLM (and the scatter in the MPNet ones) measure launch overhead and noise, not the
slimming. The CPU columns are compute-bound and show the slimming. The launch-free measurement (CUDA
graphs, medians) is evals/encoder_latency.py: once {latency_json} exists, this table uses it."""

LATENCY_NOTE = """**Speedup columns** (from {source}, made by `{command}`): each pruned model's exact
shapes (per-layer heads and FFN filters from the state file) rebuilt with random weights and slimmed by
compress, timed against its dense parent (latency depends on shapes, not weights). {method}"""


def use_encoder_latency(result: dict, path=None) -> dict:
    """Replace the rows' eager speedups by the shape-matched ones of evals/encoder_latency.py, if present."""
    path = Path(path or os.environ.get("ENCODER_LATENCY") or LATENCY_JSON)
    if not path.is_file():
        return result
    latency = json.loads(path.read_text())
    found = {(e["model"], e["task"], e["method"], round(e["flops"], 6)): e["speedup"] for e in latency["entries"]}
    for row in result["rows"]:
        row.setdefault("speedup_eager", row["speedup"])
        row["speedup"] = found.get((Path(row["model"]).name, row["task"], row["method"], round(row["flops"], 6)), {})
    result["latency"] = dict(source=_shown(path), command=latency["command"], method=latency["method"],
                             devices={d: v["name"] for d, v in latency["devices"].items() if d in latency["timings"]})
    return result


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def _header(result: dict) -> list[str]:
    command = result["command"]
    lines = ["# GLUE pruning: Fisher post-training pruning vs baselines", ""]
    lines += [HISTORY.format(command=command) if "--report-only" in command else f"Regenerate: `{command}`", ""]
    latency = result.get("latency")
    if latency:
        lines += [LATENCY_NOTE.format(**latency), ""]
        devices = latency["devices"]
    else:
        lines += [EAGER_CAVEAT.format(latency_json=_shown(LATENCY_JSON)), ""]
        devices = result["devices"]
    return lines + ["Devices: " + ", ".join(f"{k} = {v}" for k, v in devices.items()), ""]


def metric_text(values: dict) -> str:
    """A row's metrics as one cell: percent values joined by '/' (MRPC acc/F1, STS-B Pearson/Spearman)."""
    return "/".join(f"{v:.1f}" for k, v in values.items() if k != "num_examples")


def _speed(row, key):
    value = row["speedup"].get(key)
    return f"{value:.2f}x" if value else "-"


def markdown(result: dict) -> str:
    lines = _header(result) + [
             "Metrics in percent (several separated by /: MRPC acc/F1, STS-B Pearson/Spearman). Baselines keep the "
             "same FLOPs with a uniform per-layer ratio (no rearrangement, no tuning), slimmed the same way. "
             f"Speedup = dense latency / slimmed latency at sequence length {result.get('latency_seq', 128)}.", ""]
    keys = sorted({k for r in result["rows"] for k in r["speedup"]})
    methods = ["fisher"] + sorted({r["method"] for r in result["rows"] if r["method"].startswith("fisher-")})
    methods += ["magnitude", "random"]
    lines += _fisher_note(result["rows"])
    header = ["model", "task", "FLOPs", "dense", *methods, "fisher prune s", *(f"speedup {k}" for k in keys)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * (5 + len(methods) + len(keys))]
    for (model, task, flops), group in _grouped(result["rows"]).items():
        fisher = group.get("fisher")
        cells = [model, task, f"{flops:g}", metric_text(next(iter(group.values()))["dense"])]
        cells += [metric_text(group[m]["metrics"]) if m in group else "-" for m in methods]
        cells.append(f"{fisher['prune']['seconds']['total']:.1f}" if fisher and fisher.get("prune") else "-")
        cells += [_speed(fisher, k) if fisher else "-" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines += latency_search_summary()
    lines += ["", "Seconds per pruning phase (fisher):", ""]
    for (model, task, flops), group in _grouped(result["rows"]).items():
        for method in [m for m in methods if m.startswith("fisher")]:
            if method in group and group[method].get("prune"):
                phases = group[method]["prune"]["seconds"]
                name = "" if method == "fisher" else f" ({method})"
                lines.append(f"- {model} {task} FLOPs {flops:g}{name}: "
                             + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    return "\n".join(lines) + "\n"


def latency_search_summary(paths=None) -> list[str]:
    """The latency-budgeted rows (`fisher-speedupS`, guarded or not) of the latency_search*.json rounds, one
    line per round and method: tasks, FLOPs kept, measured b32 speedup range, dev change per task."""
    lines = []
    for path in [Path(p) for p in (paths or LATENCY_SEARCH_JSONS)]:
        if not path.is_file():
            continue
        for rnd in json.loads(path.read_text())["rounds"]:
            by_method: dict = {}
            for row in rnd["rows"]:
                if "speedup" in row["method"] and row.get("speedup", {}).get("cuda:b32"):
                    by_method.setdefault(row["method"], []).append(row)
            for method, rows in sorted(by_method.items()):
                speed = [r["speedup"]["cuda:b32"] for r in rows]
                kept = [r["flops_ratio"] for r in rows]
                changes = ", ".join(f"{r['task']} {metric_change(r):+.1f}" for r in rows)
                lines.append(f"- {_shown(path)}, {rnd['name']}, `{method}`: b32 {min(speed):.2f}-{max(speed):.2f}x, "
                             f"FLOPs kept {min(kept):.2f}-{max(kept):.2f}, dev change {changes}")
    if not lines:
        return []
    return ["", "With a latency budget as well (`compress prune --flops 0.5 --speedup S --latency-table T`, the "
            "table measured on the H200; CUDA-graph replays in bf16 at batch 32 x 128 against the dense model "
            "timed in the same run; first metric minus the dense model's; rows and commands in the files "
            "named):", ""] + lines


def metric_change(row) -> float:
    """A pruned row's first metric (accuracy, MRPC accuracy, STS-B Pearson) minus its dense model's."""
    first = next(k for k in row["metrics"] if k != "num_examples")
    return row["metrics"][first] - row["dense"][first]


def _fisher_note(rows) -> list[str]:
    """Which Fisher the 'fisher' column used (runs before the option existed recorded none: empirical)."""
    kinds = sorted({(r.get("prune") or {}).get("fisher", "empirical") for r in rows if r["method"] == "fisher"})
    if not kinds:
        return []
    return [f"Fisher of the `fisher` column: {', '.join(kinds)} (`compress prune --fisher`; see compress/fisher.py).", ""]


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


def latency_markdown(latency: dict) -> str:
    """The table of evals/encoder_latency.py: ms and speedup per model, variant, device and batch."""
    cols = [f"{d}:b{b}" for d in sorted(latency["timings"], key=lambda d: d != "cuda") for b in latency["batches"]]
    lines = ["# Encoder latency: slimmed vs dense (shape-matched, launch-free)", "",
             f"Regenerate: `{latency['env']} {latency['command']}`", "", f"Method: {latency['method']}", "",
             "Devices: " + "; ".join(f"{d} = {desc['name']} (" + ", ".join(f"{k} {v}" for k, v in desc.items()
                                                                       if k != "name") + ")"
                                     for d, desc in latency["devices"].items() if d in latency["timings"]), ""]
    lines += [f"- {line}" for line in _modes(latency)] + ["", "Cells: median ms per forward (speedup over the "
              "dense parent); heads, filters: totals kept over all layers.", ""]
    lines += ["| model | task | method | FLOPs | heads | filters | " + " | ".join(cols) + " |",
              "|" + "---|" * (6 + len(cols))]
    dense = [dict(model=name, task="-", method="dense", flops=1.0, heads=base["heads"], filters=base["filters"],
                  ms=latency["dense"].get(name, {}), speedup={}) for name, base in latency["bases"].items()]
    for row in dense + latency["entries"]:
        cells = [row["model"], row["task"], row["method"], f"{row['flops']:g}", str(sum(row["heads"])),
                 str(sum(row["filters"]))] + [_latency_cell(row, c) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + _target(latency, cols)) + "\n"


def _latency_cell(row: dict, col: str) -> str:
    if col not in row["ms"]:
        return "-"
    speed = row["speedup"].get(col)
    ms = row["ms"][col]
    return (f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}") + (f" ({speed:.2f}x)" if speed else "")


def _modes(latency: dict) -> list[str]:
    """How each device's timings were made: CUDA-graph replays, or eager (with the capture error)."""
    lines = []
    for device, timings in latency["timings"].items():
        runs = [t for shape in timings.values() for t in shape.values()]
        eager = [t for t in runs if t["mode"] == "eager"]
        lines.append(f"{device}: {len(runs) - len(eager)} of {len(runs)} timings as CUDA-graph replays"
                     if device == "cuda" else f"{device}: {len(runs)} timings, eager")
        lines += sorted({f"{device}, eager fallback: {t['note']}" for t in eager if t.get("note")})
    return lines


def _target(latency: dict, cols: list[str]) -> list[str]:
    """Issue #2's target, speedup >= 1.6x at FLOPs 0.5: the fisher range over tasks per model and column."""
    lines = ["Speedup of fisher at FLOPs 0.5 (issue #2 target: at least 1.6x), min-max over tasks:", ""]
    for name in latency["bases"]:
        rows = [e for e in latency["entries"] if e["model"] == name and e["method"] == "fisher" and e["flops"] == 0.5]
        spans = [(c, [r["speedup"][c] for r in rows if c in r["speedup"]]) for c in cols]
        lines.append(f"- {name}: " + (", ".join(f"{c} {min(v):.2f}-{max(v):.2f}x" for c, v in spans if v) or "-"))
    return lines


def write_report(result: dict, out: Path, latency_json=None) -> None:
    use_encoder_latency(result, latency_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}.md, .json, .png")

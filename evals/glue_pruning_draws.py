"""Tables of dev metrics over several fine-tune draws, from the state files of evals/glue_pruning.py.

Each GPU machine hold fine-tunes its own dense parents (GPU training is not bit-reproducible), so a
method comparison is only fair within one state file: a "draw". This script lines up the draws,
method by method, with each pruned model's drop from its own dense parent in GLUE task score (the
mean of the task's metrics: MRPC accuracy and F1, STS-B Pearson and Spearman, else accuracy).

    python evals/glue_pruning_draws.py evals/results/glue_pruning_weights_state.json \
        --out evals/results/glue_pruning_weights

The state file holds {"draws": {label: state, ...}, "commands": {label: [command, ...]}, "notes": [...]}
(a command's "  # " starts a remark printed after it); a plain
state.json of glue_pruning.py is read as one draw labelled by its file name.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evals.glue_pruning_report import metric_text  # noqa: E402

KEY = re.compile(r"(?P<work>.*)/(?P<model>[^/]+)-(?P<task>[a-z0-9]+)/(?P<name>[^/]+):eval$")


def task_score(metrics: dict) -> float:
    values = [v for k, v in metrics.items() if k != "num_examples"]
    return sum(values) / len(values)


def collect(draws: dict) -> list[dict]:
    """One row per (draw, model, task, FLOPs) with a dense parent: its metrics and each method's."""
    dense, pruned = {}, {}
    for label, state in draws.items():
        for key, metrics in state.items():
            match = KEY.match(key)
            if not match or metrics is None:
                continue
            base = (label, match["model"], match["task"])
            if match["name"] == "dense":
                dense[base] = metrics
            else:
                method, flops = match["name"].rsplit("-", 1)
                pruned.setdefault((*base, float(flops)), {})[method] = metrics
    rows = []
    for (label, model, task, flops), methods in sorted(pruned.items(), key=lambda kv: (kv[0][1:3], -kv[0][3], kv[0][0])):
        parent = dense.get((label, model, task))
        if parent is not None:
            rows.append({"draw": label, "model": model, "task": task, "flops": flops, "dense": parent,
                         "methods": methods,
                         "drop": {m: task_score(v) - task_score(parent) for m, v in methods.items()}})
    return rows


def markdown(rows: list[dict], commands: dict, source: str, notes=()) -> str:
    methods = sorted({m for r in rows for m in r["methods"]}, key=lambda m: (m != "fisher-masks", m != "fisher-weights", m))
    lines = ["# GLUE pruning over fine-tune draws: mask tuning (`fisher`) against weight tuning (`fisher-weights`)", "",
             f"Regenerate this file: `python evals/glue_pruning_draws.py {source} --out OUT` (the state file holds "
             "every number below). The draws were made on the H100 machine by:", ""]
    for label, cmds in commands.items():
        lines.append(f"- draw {label}:")
        for command in cmds:
            code, _, note = command.partition("  # ")
            lines.append(f"  - `{code}`" + (f" ({note})" if note else ""))
    lines += ["", "Dev metrics in percent (MRPC acc/F1, STS-B Pearson/Spearman); delta = task score (their mean) minus "
              "the dense parent's of the same draw.", "",
              "| model | task | FLOPs | draw | dense | " + " | ".join(methods) + " | "
              + " | ".join(f"delta {m}" for m in methods) + " |",
              "|" + "---|" * (5 + 2 * len(methods))]
    for r in rows:
        cells = [r["model"], r["task"], f"{r['flops']:g}", r["draw"], metric_text(r["dense"])]
        cells += [metric_text(r["methods"][m]) if m in r["methods"] else "-" for m in methods]
        cells += [f"{r['drop'][m]:+.1f}" if m in r["drop"] else "-" for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Worst delta over every (model, task, draw) cell, and cells within 1 point of dense:", "",
              "| FLOPs | method | cells | worst delta | within 1 point |", "|---|---|---|---|---|"]
    for flops in sorted({r["flops"] for r in rows}, reverse=True):
        for m in methods:
            drops = [r["drop"][m] for r in rows if r["flops"] == flops and m in r["drop"]]
            if drops:
                lines.append(f"| {flops:g} | {m} | {len(drops)} | {min(drops):+.1f} | "
                             f"{sum(d >= -1.0 for d in drops)} of {len(drops)} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("states", nargs="+", help="a {draws: ...} file, or glue_pruning.py state.json files")
    p.add_argument("--out", required=True, help="output path without suffix (.md and .json are written)")
    args = p.parse_args(argv)
    draws, commands, notes = {}, {}, []
    for path in map(Path, args.states):
        data = json.loads(path.read_text())
        if "draws" in data:
            draws.update(data["draws"])
            commands.update(data.get("commands", {}))
            notes += data.get("notes", [])
        else:
            draws[path.stem] = data
    rows = collect(draws)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "commands": commands}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, commands, " ".join(args.states), notes))
    print(f"wrote {out}.md and .json ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

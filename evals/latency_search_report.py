"""Tabulate latency-aware pruning runs: dev metric, FLOPs kept, the latency table's prediction and the
measured latency of each pruned shape, per task and method (issue #2's 1.6x target at FLOPs 0.5).

Inputs are what the GPU runs leave: a glue_pruning state file (dev metrics, kept shapes, and for the
fisher-speedupS methods the budget and predicted ms from `compress prune --latency-table`) and the
encoder_latency.py JSON timed from that same state (CUDA-graph replays of each shape). Each round of
runs is one `--round NAME STATE LATENCY` triple; rounds are different fine-tunes, so they are kept apart.

    python evals/latency_search_report.py --table evals/results/latency_table_h200_mpnet-base.json \
        --round "round 1" evals/results/latency_search_r1_state.json evals/results/latency_search_r1_latency.json \
        --round "round 2" evals/results/latency_search_r2_state.json evals/results/latency_search_r2_latency.json \
        --note "..." --out evals/results/latency_search
(the exact line, with its round names and note, is at the top of each .md it writes)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.glue_pruning_report import metric_change, metric_text  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--round", nargs=3, action="append", required=True, metavar=("NAME", "STATE", "LATENCY"),
                   help="LATENCY '-': no GPU timings of this round (only the table's predictions)")
    p.add_argument("--title", default="Latency-aware pruning of MPNet-base at FLOPs 0.5 (H200, bf16)")
    p.add_argument("--note", default=None, help="a paragraph printed under the header")
    p.add_argument("--table", required=True, help="the latency table the runs used: every row is predicted by it")
    p.add_argument("--out", required=True, help="output path without suffix (.md and .json)")
    return p.parse_args(argv)


def rows_of(name: str, state: dict, latency: dict, table) -> list[dict]:
    measured = {(e["task"], e["method"], e["flops"]): e for e in (latency or {}).get("entries", [])}
    rows = []
    for key, value in state.items():
        if not key.endswith(":prune"):
            continue
        run = Path(key[: -len(":prune")])
        task = run.parent.name.split("-")[-1]
        method, flops = run.name.rsplit("-", 1)
        metrics, dense = state.get(f"{run}:eval"), state.get(f"{run.parent / 'dense'}:eval")
        timing = measured.get((task, method, float(flops)))
        if metrics is None or dense is None:
            continue  # a run cut short: its shape may be timed, its model was never evaluated
        lat = value.get("latency", {})
        rows.append(dict(round=name, task=task, method=method, flops=float(flops), flops_ratio=value["flops_ratio"],
                         heads=value["heads"], filters=value["filters"], dense=dense, metrics=metrics,
                         predicted_ms=table.model_ms(value["heads"], value["filters"]), budget_ms=lat.get("budget_ms"),
                         predicted_speedup=table.meta["dense_ms"] / table.model_ms(value["heads"], value["filters"]),
                         ms=(timing or {}).get("ms", {}), speedup=(timing or {}).get("speedup", {})))
    return sorted(rows, key=lambda r: (r["task"], r["method"]))


def markdown(rounds: list[dict], title: str, table_path: str, note: str | None = None) -> str:
    lines = [f"# {title}", "",
             f"`fisher-speedupS`: `compress prune --flops 0.5 --speedup S --latency-table {table_path}` (the FLOPs "
             "budget and a latency budget of the table's dense time / S, together); `-iter4`: with `--search-steps "
             "4`; `-free`: with `--no-keep-last-head`. `fisher`: `--flops 0.5` alone. "
             "Metrics in percent (MRPC acc/F1, STS-B Pearson/Spearman); change = first metric minus the dense "
             "model's. Predicted: the table's ms for the kept shape (widths off its grid interpolated). Measured: "
             "evals/encoder_latency.py, CUDA-graph replays of the same shape, batch 32 x 128, against the dense model "
             "timed in the same run.", ""] + ([note, ""] if note else [])
    errors = [row["ms"]["cuda:b32"] / row["predicted_ms"] - 1 for r in rounds for row in r["rows"] if row["ms"].get("cuda:b32")]
    if errors:
        lines += [f"The table against the measurements, {len(errors)} pruned shapes: measured minus predicted "
                  f"{100 * min(errors):+.1f}% to {100 * max(errors):+.1f}% (mean {100 * sum(errors) / len(errors):+.1f}%).", ""]
    for r in rounds:
        lines += [f"## {r['name']}", "", f"Pruned and evaluated by: `{r['command']}`.", ""]
        if r["latency_command"]:
            lines += [f"Timed by: `{r['latency_command']}` (from the committed state: `python evals/encoder_latency.py "
                      f"--state {r['state']} --devices cuda --out OUT`).", "",
                      f"Dense measured: {r['dense_ms']:.3f} ms at b32 ({r['dense_b1']:.3f} at b1).", ""]
        else:
            lines += [f"Not timed on the GPU: the speedup columns are empty; to time the shapes, `python "
                      f"evals/encoder_latency.py --state {r['state']} --devices cuda --out OUT`.", ""]
        lines += ["| task | method | FLOPs kept | dense | pruned | change | predicted ms (speedup) | measured b32 ms | "
                  "speedup b32 | speedup b1 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            change = metric_change(row)
            b32, b1, ms = row["speedup"].get("cuda:b32"), row["speedup"].get("cuda:b1"), row["ms"].get("cuda:b32")
            lines.append(f"| {row['task']} | {row['method']} | {row['flops_ratio']:.3f} | {metric_text(row['dense'])} | "
                         f"{metric_text(row['metrics'])} | {change:+.1f} | {row['predicted_ms']:.3f} "
                         f"({row['predicted_speedup']:.2f}x) | {f'{ms:.3f}' if ms else '-'} | "
                         f"{f'{b32:.2f}x' if b32 else '-'} | {f'{b1:.2f}x' if b1 else '-'} |")
        lines.append("")
    return "\n".join(lines)


def _command_line() -> str:
    import shlex

    return "python evals/latency_search_report.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def main(argv=None) -> int:
    args = parse_args(argv)
    from compress.pruning.latency import load_table

    table = load_table(args.table)
    rounds = []
    for name, state_path, latency_path in args.round:
        state = json.loads(Path(state_path).read_text())
        latency = None if latency_path == "-" else json.loads(Path(latency_path).read_text())
        dense = next(iter(latency["dense"].values())) if latency else {"cuda:b32": float("nan"), "cuda:b1": float("nan")}
        rounds.append(dict(name=name, command=state.get("_command", "see the file's header"), state=state_path,
                           latency_command=latency and latency["command"], dense_ms=dense["cuda:b32"],
                           dense_b1=dense["cuda:b1"],
                           rows=rows_of(name, state, latency, table)))
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"rounds": rounds}, indent=1) + "\n")
    md = markdown(rounds, args.title, args.table, args.note)
    md = md.replace("\n\n", f"\n\nRegenerate this file: `{_command_line()}`\n\n", 1)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

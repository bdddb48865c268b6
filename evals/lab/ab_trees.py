"""A/B of whole source trees on the GPU machine: each tree's batch-1 decode measured in its own process,
the trees alternated for `--rounds` rounds so that drift shows up as spread, then one table.

A tree is a folder holding an export of the repository (a branch, or main as the base). Here, once:

    python evals/lab/ab_trees.py prepare _ab main gemv-2d-m1          # git archive each ref into _ab/<ref>

then on the device machine (the call carries `_ab`; `.git/info/exclude` should list it):

    python evals/lab/ab_trees.py run _ab/main _ab/gemv-2d-m1 --rounds 2 --json $OUT/ab.json

`run` calls `evals/bench_overlap.py --compare overlap` inside each tree (its own code, its own kernels)
and keeps the overlapped loop's row: engine step, graph replay and bandwidth floor at batch 1, and the
offline output tokens/s. The first tree is the base of the deltas. `--budget-s` ends the rounds early
(after a whole round) so that a device call never runs past its limit with nothing printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = "evals/bench_overlap.py"
WORKLOAD = ["--model", "gemma-2-2b", "--compare", "overlap", "--repeats", "1", "--num-requests", "32",
            "--max-num-seqs", "32"]


def prepare(out: Path, refs: list[str], repo: Path) -> list[Path]:
    """`git archive` of each ref into out/<ref> (slashes become '_'); an existing folder is replaced."""
    trees = []
    for ref in refs:
        tree = out / ref.replace("/", "_")
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(repo), "archive", ref], capture_output=True)
        if archive.returncode != 0:
            raise ValueError(f"git archive {ref} failed: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        trees.append(tree)
    return trees


def measure(tree: Path, bench: str, extra: list[str]) -> dict:
    """One bench_overlap run inside `tree`; its "overlap on" row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        proc = subprocess.run([sys.executable, bench, *extra, "--json", str(out)], cwd=tree,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{tree}: {bench} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
        rows = json.loads(out.read_text())["rows"]
    for row in rows:
        if row["name"] == "overlap on":
            return row
    raise RuntimeError(f"{tree}: {bench} wrote no 'overlap on' row (is --compare overlap among its arguments?)")


def summarize(rows: list[dict]) -> list[dict]:
    """Per tree, in first-seen order: every round's step, the medians, and the delta to the first tree."""
    trees = list(dict.fromkeys(r["tree"] for r in rows))
    out = []
    for tree in trees:
        mine = [r for r in rows if r["tree"] == tree]
        step = statistics.median(r["step_ms"] for r in mine)
        floor = statistics.median(r["floor_ms"] for r in mine)
        out.append({"tree": tree, "steps_ms": [round(r["step_ms"], 3) for r in mine], "step_ms": step,
                    "replay_ms": statistics.median(r["replay_ms"] for r in mine), "floor_ms": floor,
                    "ratio": step / floor, "output_tok_s": statistics.median(r["output_tok_s"] for r in mine)})
    for row in out:
        row["delta_us"] = (row["step_ms"] - out[0]["step_ms"]) * 1e3
    return out


def table(summary: list[dict]) -> str:
    lines = ["| tree | steps (ms, per round) | step ms | replay ms | floor ms | step / floor | vs first (us) "
             "| output tok/s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summary:
        lines.append(f"| {s['tree']} | {' / '.join(f'{v:.3f}' for v in s['steps_ms'])} | {s['step_ms']:.3f} | "
                     f"{s['replay_ms']:.3f} | {s['floor_ms']:.3f} | {s['ratio']:.3f}x | {s['delta_us']:+.1f} | "
                     f"{s['output_tok_s']:,.0f} |")
    return "\n".join(lines)


def run(trees: list[Path], rounds: int, budget_s: float, bench: str, extra: list[str]) -> tuple[list[dict], bool]:
    """(the rows measured, whether every run succeeded): a failing tree ends the rounds."""
    rows, start = [], time.monotonic()
    for round_index in range(rounds):
        round_start = time.monotonic()
        for tree in trees:
            try:
                row = measure(tree, bench, extra)
            except RuntimeError as error:
                print(f"error: {error}", file=sys.stderr)
                return rows, False
            rows.append({"tree": tree.name, "round": round_index + 1, **row})
            print(f"round {round_index + 1} {tree.name}: step {row['step_ms']:.3f} ms, "
                  f"floor {row['floor_ms']:.3f} ms", flush=True)
        elapsed = time.monotonic() - start
        if elapsed + (time.monotonic() - round_start) > budget_s and round_index + 1 < rounds:
            print(f"stopping after round {round_index + 1}: another would pass --budget-s {budget_s:.0f}")
            break
    return rows, True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="export refs into folders (here, with git)")
    prep.add_argument("out", type=Path)
    prep.add_argument("refs", nargs="+")
    go = sub.add_parser("run", help="measure the trees, alternated (on the GPU machine)")
    go.add_argument("trees", nargs="+", type=Path)
    go.add_argument("--rounds", type=int, default=2)
    go.add_argument("--budget-s", type=float, default=480.0, help="no new round past this many seconds")
    go.add_argument("--bench", default=BENCH, help="benchmark script, relative to each tree")
    go.add_argument("--bench-args", default=" ".join(WORKLOAD), help="its arguments (one string)")
    go.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.command == "prepare":
        try:
            trees = prepare(args.out, args.refs, Path(__file__).resolve().parents[2])
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print("\n".join(map(str, trees)))
        return 0
    missing = [str(t) for t in args.trees if not (t / args.bench).is_file()]
    if missing:
        print(f"error: no {args.bench} in {', '.join(missing)} (make the trees with `prepare`)", file=sys.stderr)
        return 2
    rows, ok = run(args.trees, args.rounds, args.budget_s, args.bench, args.bench_args.split())
    if not rows:
        return 1
    summary = summarize(rows)
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "summary": summary, "rows": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

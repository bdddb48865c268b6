"""evals/lab/ab_trees.py: the per-tree summary, the alternated rounds (with a stand-in benchmark that writes
bench_overlap's JSON), the time budget, a failing tree, and exporting refs with git."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals" / "lab"))
import ab_trees  # noqa: E402

FAKE_BENCH = """
import json, sys
from pathlib import Path
step = float(Path("step.txt").read_text())
rows = [{"name": "overlap off", "step_ms": 9.0, "replay_ms": 9.0, "floor_ms": 2.0, "output_tok_s": 1.0},
        {"name": "overlap on", "step_ms": step, "replay_ms": step - 0.001, "floor_ms": 2.0, "output_tok_s": 100.0}]
Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps({"rows": rows}))
"""

FLAKY_BENCH = """
from pathlib import Path
if Path("ran").exists():
    raise SystemExit("second run failed")
Path("ran").write_text("")
""" + FAKE_BENCH


def make_tree(root: Path, name: str, step, bench: str = FAKE_BENCH) -> Path:
    tree = root / name
    (tree / "evals").mkdir(parents=True)
    (tree / "evals" / "bench_overlap.py").write_text(bench)
    (tree / "step.txt").write_text(str(step))
    return tree


def test_summary_takes_medians_per_tree_and_deltas_to_the_first():
    rows = [{"tree": t, "step_ms": s, "replay_ms": s, "floor_ms": 2.0, "output_tok_s": 10.0}
            for t, s in (("base", 2.30), ("new", 2.20), ("base", 2.26), ("new", 2.24), ("base", 2.28), ("new", 2.22))]
    summary = ab_trees.summarize(rows)
    assert [s["tree"] for s in summary] == ["base", "new"]
    assert summary[0]["step_ms"] == pytest.approx(2.28) and summary[1]["step_ms"] == pytest.approx(2.22)
    assert summary[1]["delta_us"] == pytest.approx(-60.0) and summary[1]["ratio"] == pytest.approx(1.11)
    assert "| new | 2.200 / 2.240 / 2.220 | 2.220 |" in ab_trees.table(summary)


def test_run_alternates_trees_and_writes_the_table(tmp_path, capsys):
    trees = [make_tree(tmp_path, "base", 2.25), make_tree(tmp_path, "new", 2.20)]
    out = tmp_path / "ab.json"
    assert ab_trees.main(["run", *map(str, trees), "--rounds", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("round 1 base") < printed.index("round 1 new") < printed.index("round 2 base")
    result = json.loads(out.read_text())
    assert [r["tree"] for r in result["rows"]] == ["base", "new", "base", "new"]
    assert result["summary"][1]["delta_us"] == pytest.approx(-50.0)


def test_budget_ends_the_rounds_and_a_failing_tree_is_an_error(tmp_path, capsys):
    trees = [make_tree(tmp_path, "base", 2.25), make_tree(tmp_path, "new", 2.20)]
    assert ab_trees.main(["run", *map(str, trees), "--rounds", "3", "--budget-s", "0"]) == 0
    assert "stopping after round 1" in capsys.readouterr().out
    broken = make_tree(tmp_path, "broken", 0, bench="raise SystemExit('kernel failed')")
    assert ab_trees.main(["run", str(trees[0]), str(broken)]) == 1
    assert "broken" in capsys.readouterr().err
    flaky = make_tree(tmp_path, "flaky", 2.3, bench=FLAKY_BENCH)                    # fails in round 2 only
    assert ab_trees.main(["run", str(flaky), str(trees[0]), "--rounds", "2"]) == 1
    assert "flaky" in capsys.readouterr().err
    assert ab_trees.main(["run", str(tmp_path / "absent")]) == 2


def test_prepare_exports_a_ref(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    (tree,) = ab_trees.prepare(tmp_path / "ab", ["HEAD"], repo)
    assert (tree / "evals" / "bench_overlap.py").is_file() and not (tree / ".git").exists()
    assert ab_trees.main(["prepare", str(tmp_path / "ab"), "no-such-ref"]) == 2

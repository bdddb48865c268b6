"""evals/bench_spec.py runs end to end in its --quick mode (tiny shapes, CPU) and writes its table."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))


@pytest.mark.slow
def test_bench_spec_quick(tmp_path):
    import bench_spec
    out = tmp_path / "spec.md"
    argv = ["--quick", "--modes", "off,2,auto", "--batches", "2", "--rates", "1000", "--num-rate-requests", "3",
            "--output-len", "4", "--workdir", str(tmp_path / "models"), "--out", str(out)]
    assert bench_spec.main(argv) == 0
    text = out.read_text()
    assert text.startswith("`python evals/bench_spec.py --quick")
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")][1:] == ["off", "2", "auto"]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows["2"]["acceptance"] > 0 and "acceptance" not in rows["off"]


@pytest.mark.slow
@pytest.mark.parametrize("fast_path", ["off", "on"])
def test_replayed_acceptance_is_what_the_target_verifies(tmp_path, fast_path):
    """Acceptance 1 replays the target's own continuation: every drafted token is accepted, on the eager
    passes and on the graph passes (fast path on: their CPU twin, greedy drafts chained on the device)."""
    import bench_spec
    out = tmp_path / "spec.md"
    argv = ["--quick", "--modes", "off,3", "--batches", "2", "--rates", "1000", "--num-rate-requests", "2",
            "--output-len", "16", "--acceptance", "1.0", "--fast-path", fast_path,
            "--workdir", str(tmp_path / "models"), "--out", str(out)]
    assert bench_spec.main(argv) == 0
    row = json.loads(out.with_suffix(".json").read_text())["rows"]["3"]
    assert row["acceptance"] == 1.0 and row["mean_accepted_length"] > 1.5
    assert (row["graph_steps"] > 0) == (fast_path == "on")

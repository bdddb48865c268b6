"""evals/spec_acceptance.py end to end at its --quick scale on a tiny seeded Gemma 3 (the real held-out text, a
byte-level tokenizer): a depth child and a width child are pruned, distilled, saved and served as drafts; and
evals/bench_spec.py's --acceptance-from reads the best child's per-token acceptance from its JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from serve_fixtures import gemma3_config, random_model, save_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))


@pytest.mark.parametrize("p, k", [(0.3, 2), (0.8, 4), (0.95, 8), (0.5, 1)])
def test_per_token_acceptance_inverts_the_rate_at_k(p, k):
    from evals.spec_acceptance import per_token_acceptance

    rate = p * (1 - p ** k) / ((1 - p) * k)  # accepted per drafted token, each kept with p up to the first miss
    assert per_token_acceptance(rate, k) == pytest.approx(p, abs=1e-3)


@pytest.mark.slow
@pytest.mark.data
def test_spec_acceptance_quick_on_a_tiny_gemma(tmp_path, data_dir):
    from evals import spec_acceptance

    save_model(random_model(gemma3_config(4), seed=2), tmp_path / "tiny")
    out = tmp_path / "acc"
    argv = ["--quick", "--model", str(tmp_path / "tiny"), "--data-dir", str(data_dir), "--children", "drop:2",
            "flops:0.5", "--ks", "1", "2", "--prompt-len", "24", "--output-len", "8", "--eval-seq-len", "32",
            "--device", "cpu", "--workdir", str(tmp_path / "children"), "--out", str(out)]
    assert spec_acceptance.main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    depth, width = result["children"]
    assert result["complete"] and result["target"]["layers"] == 4
    assert depth["layers"] == 2 and len(depth["dropped_layers"]) == 2 and width["layers"] == 4
    assert width["non_embedding_params"] < result["target"]["non_embedding_params"]
    for child in result["children"]:
        assert (Path(child["dir"]) / "config.json").is_file() and list(child["runs"]) == ["1", "2"]
        for run in child["runs"].values():
            assert 0 <= run["acceptance"] <= 1 and 1 <= run["mean_accepted_length"] <= 3
            assert run["greedy"]["of"] == 4 and len(run["greedy"]["first_differences"]) == 4 - run["greedy"]["equal"]
            assert run["batch1_draft_ms_per_token"] > 0 and run["batch1_verify_ms_per_token"] > 0
    text = out.with_suffix(".md").read_text()
    assert "Command: `python -m evals.spec_acceptance --quick" in text and "| drop:2 | 2 |" in text
    assert len([line for line in text.splitlines() if line.startswith("| flops:0.5 | ")]) == 3  # shape row, K=1, K=2

    import bench_spec
    args = bench_spec.parse_args(["--quick", "--acceptance-from", str(out.with_suffix(".json")), "--acceptance-k", "1"])
    best = max(c["runs"]["1"]["per_token_acceptance"] for c in result["children"])
    assert args.acceptance == best and "at K=1" in args.acceptance_source


def test_bench_spec_takes_the_best_child_at_k(tmp_path):
    import bench_spec

    runs = {"a": {"2": 0.5, "4": 0.6}, "b": {"2": 0.7, "4": 0.4, "auto": None}}
    children = [{"name": name, "runs": {k: {} if p is None else {"per_token_acceptance": p} for k, p in by_k.items()}}
                for name, by_k in runs.items()]
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"command": "python -m evals.spec_acceptance", "settings": {"model": "m"},
                                "children": children}))
    args = bench_spec.parse_args(["--acceptance-from", str(path)])
    assert args.acceptance == 0.6 and "draft a at K=4" in args.acceptance_source
    assert bench_spec.parse_args(["--acceptance-from", str(path), "--acceptance-k", "2"]).acceptance == 0.7
    with pytest.raises(SystemExit, match="no run at K=3"):
        bench_spec.parse_args(["--acceptance-from", str(path), "--acceptance-k", "3"])

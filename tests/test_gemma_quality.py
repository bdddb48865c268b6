"""evals/gemma_quality.py end to end at its --quick scale on a tiny random Gemma 3 (the real text, the tiny
word-level tokenizer): every method x budget row is there, the report states the targets, stability and
continuations."""

from __future__ import annotations

import json

import pytest

from test_gemma_prune import _model, _tokenizer


def _tiny(tmp_path):
    _model("gemma3").save_pretrained(tmp_path / "tiny")
    _tokenizer().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _args(tiny, data_dir, out, *more):
    # a random model reads text at about its vocabulary's perplexity: no sanity bound
    return ["--quick", "--model", str(tiny), "--data-dir", str(data_dir), "--methods", "fisher-group", "activation",
            "--device", "cpu", "--out", str(out), "--max-dense-perplexity", "0", *more]


@pytest.mark.slow
@pytest.mark.data
def test_quality_table_quick_on_a_tiny_gemma(tmp_path, data_dir):
    from evals import gemma_quality

    out = tmp_path / "gq"
    assert gemma_quality.main(_args(_tiny(tmp_path), data_dir, out)) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    cells = [(r["method"], r["tokens"]) for r in result["rows"]]
    assert cells == [("dense", 0), ("fisher-group", 0), ("activation", 0)] + [
        (m, t) for m in ("fisher-group", "activation") for t in (128, 256)]  # no training first, then distilled
    assert result["complete"] and len(result["stability"]) == 2
    assert all(0 <= r["agreement"] <= 1 and r["flops_ratio"] <= 0.8 + 1e-9 for r in result["rows"][1:])
    assert ["continuations" in r for r in result["rows"]] == [True, True, True, False, True, False, True]
    text = out.with_suffix(".md").read_text()
    assert text.startswith("# Slimmed") and "Command: `python -m evals.gemma_quality --quick" in text
    assert "FLOPs 0.8, distilled: best" in text and "FLOPs 0.5, distilled: not run" in text
    assert "## Stability" in text and "## Greedy continuations" in text


@pytest.mark.slow
@pytest.mark.data
def test_two_stages_give_the_one_stage_table(tmp_path, data_dir):
    """--stage prune then --stage distill (slimmed models through the disk) give the rows of one run."""
    from evals import gemma_quality

    tiny = _tiny(tmp_path)
    whole, staged = tmp_path / "whole", tmp_path / "staged"
    gemma_quality.main(_args(tiny, data_dir, whole, "--methods", "fisher-group"))
    gemma_quality.main(_args(tiny, data_dir, staged, "--methods", "fisher-group", "--stage", "prune",
                             "--workdir", str(tmp_path / "models")))
    pruned = json.loads(staged.with_suffix(".json").read_text())
    assert [r["tokens"] for r in pruned["rows"]] == [0, 0] and pruned["pruned"] and not pruned.get("complete")
    gemma_quality.main(_args(tiny, data_dir, staged, "--methods", "fisher-group", "--stage", "distill",
                             "--workdir", str(tmp_path / "models")))
    one, two = (json.loads(p.with_suffix(".json").read_text()) for p in (whole, staged))
    keys = ("method", "flops", "tokens", "perplexity", "agreement", "kl")
    assert [{k: r[k] for k in keys} for r in two["rows"]] == [{k: r[k] for k in keys} for r in one["rows"]]
    assert two["complete"] and "--stage prune" in two["command"] and "--stage distill" in two["command"]


def test_a_dense_model_that_reads_noise_stops_the_run(tmp_path, data_dir):
    from evals import gemma_quality

    with pytest.raises(SystemExit, match="perplexity is .*broken"):
        gemma_quality.main(_args(_tiny(tmp_path), data_dir, tmp_path / "gq", "--max-dense-perplexity", "2"))

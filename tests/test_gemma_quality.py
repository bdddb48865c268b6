"""evals/gemma_quality.py end to end at its --quick scale on a tiny random Gemma 3 (the real text, the tiny
word-level tokenizer): every method x budget row is there, the report states the targets, stability and
continuations."""

from __future__ import annotations

import json

import pytest

from test_gemma_prune import _model, _tokenizer


@pytest.mark.slow
@pytest.mark.data
def test_quality_table_quick_on_a_tiny_gemma(tmp_path, data_dir):
    from evals import gemma_quality

    _model("gemma3").save_pretrained(tmp_path / "tiny")
    _tokenizer().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "gq"
    assert gemma_quality.main(["--quick", "--model", str(tmp_path / "tiny"), "--data-dir", str(data_dir),
                               "--methods", "fisher-group", "activation", "--device", "cpu", "--out", str(out)]) == 0
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

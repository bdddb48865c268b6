"""evals/bench_embed.py end to end on this CPU with tiny encoders (`--quick`): stage the shapes of a model and
its slimmed twin, then measure the engine, the server (a real `compress serve` process) and classification
with random weights, and write the tables. The GPU run is the same command without `--quick`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from encoder_fixtures import st_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))


@pytest.mark.slow
def test_bench_embed_quick(tmp_path):
    import bench_embed
    from compress.embeddings.model import load_embedder
    from compress.arch import get_adapter
    from compress.models import checkpoint
    from compress.pruning.slim import slim_model

    parent = st_dir(tmp_path / "tiny", "bert", "mean")
    (parent / "sentence_bert_config.json").write_text('{"max_seq_length": 64}')  # --quick texts: up to 40 tokens
    embedder, tok = load_embedder(parent)
    slim_model(get_adapter(embedder.encoder), [torch.tensor([1.0, 1, 0, 0])] * 2, [torch.ones(128)] * 2)
    checkpoint.save(embedder.encoder, tok, tmp_path / "slim", source_dir=parent)
    stage = tmp_path / "stage"
    assert bench_embed.main(["stage", "-o", str(stage), "--model", str(parent), "--slimmed", str(tmp_path / "slim")]) == 0
    out = tmp_path / "results" / "embed"
    assert bench_embed.main(["run", "--stage", str(stage), "--out", str(out), "--work", str(tmp_path / "work"),
                             "--quick", "--no-st"]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert set(results["embed"]) == {"tiny", "tiny-slim"} and results["embed"]["tiny"]["server"]["inputs_per_s"] > 0
    assert set(results["classify"]) == {"tiny", "tiny+topk0.5", "tiny-slim", "tiny-slim+topk0.5"}
    assert "| tiny-slim |" in out.with_suffix(".md").read_text()
